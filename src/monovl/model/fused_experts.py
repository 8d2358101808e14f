"""The routed FFN of a layer as two Triton launches covering both experts: a grouped gate/up GEMM with SwiGLU
fused (h = silu(x W1ᵀ) · x W3ᵀ), then a grouped down GEMM (h W2ᵀ). Rows are grouped by expert (text rows, then
visual rows); each program owns a BLOCK_M × BLOCK_N tile of one expert's rows and reads that expert's weights in
place (no stacked copy). Used on CUDA when Triton is installed (`pip install 'monovl[triton]'`) and the FFNs are
plain float linears without biases; otherwise `Routing` runs the experts one after the other (the fallback, and
the reference the tests hold the kernel to, under TRITON_INTERPRET=1 on CPU).
"""
from __future__ import annotations

import functools
import importlib.util

import torch

BLOCK_M, BLOCK_N, BLOCK_K = 16, 32, 32


@functools.cache
def _kernel():
    """The Triton kernel, defined on first use (importing Triton is slow, and TRITON_INTERPRET is read then)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _grouped_kernel(x_ptr, wa_txt, wa_vis, wb_txt, wb_vis, out_ptr, tile_expert, tile_row, group_end,
                        K, N, SWIGLU: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """out[rows, cols] = x[rows] @ Waᵀ (SWIGLU: silu(x Waᵀ) · x Wbᵀ) for the rows of one expert's tile."""
        tile, pid_n = tl.program_id(0), tl.program_id(1)
        expert = tl.load(tile_expert + tile)
        row0 = tl.load(tile_row + tile)
        row_end = tl.load(group_end + expert)
        rows = row0 + tl.arange(0, BM)
        cols = pid_n * BN + tl.arange(0, BN)
        if expert == 0:
            wa, wb = wa_txt, wb_txt
        else:
            wa, wb = wa_vis, wb_vis
        acc_a = tl.zeros((BM, BN), dtype=tl.float32)
        acc_b = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            x_mask = (rows[:, None] < row_end) & (ks[None, :] < K)
            xt = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=x_mask, other=0.0).to(tl.float32)
            w_mask = (cols[None, :] < N) & (ks[:, None] < K)
            w_off = cols[None, :] * K + ks[:, None]  # (BK, BN): W is (N, K), read transposed
            acc_a += tl.dot(xt, tl.load(wa + w_off, mask=w_mask, other=0.0).to(tl.float32))
            if SWIGLU:
                acc_b += tl.dot(xt, tl.load(wb + w_off, mask=w_mask, other=0.0).to(tl.float32))
        out = acc_a * tl.sigmoid(acc_a) * acc_b if SWIGLU else acc_a
        o_mask = (rows[:, None] < row_end) & (cols[None, :] < N)
        tl.store(out_ptr + rows[:, None] * N + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=o_mask)

    return triton, _grouped_kernel


@functools.cache
def _have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def available(x: torch.Tensor, ffn, ffn_ve) -> bool:
    """Whether the fused path can run this layer's FFN on x."""
    if ffn_ve is None or x.device.type != "cuda" or not _have_triton():
        return False
    linears = [*ffn.linears(), *ffn_ve.linears()]  # (gate, up, down) of each
    return all(isinstance(m, torch.nn.Linear) and m.bias is None for m in linears)


def _tiles(counts: list[int], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per tile: its expert and first row; per expert: the end of its rows in the grouped order."""
    experts, rows, start = [], [], 0
    for e, n in enumerate(counts):
        for r in range(start, start + n, BLOCK_M):
            experts.append(e)
            rows.append(r)
        start += n
    ends = torch.tensor(counts).cumsum(0)
    return tuple(torch.as_tensor(v, dtype=torch.int32).to(device) for v in (experts, rows, ends))


def grouped_ffn(x_txt: torch.Tensor, x_vis: torch.Tensor, ffn, ffn_ve) -> torch.Tensor:
    """Text rows (Nt, D) through `ffn` and visual rows (Nv, D) through `ffn_ve` → (Nt + Nv, D), grouped in that
    order, in two launches for both experts."""
    triton, kernel = _kernel()
    x = torch.cat([x_txt, x_vis]).contiguous()  # (Nt + Nv, D), grouped by expert
    (g_t, u_t, d_t), (g_v, u_v, d_v) = ffn.linears(), ffn_ve.linears()
    m, d = x.shape
    f = g_t.weight.shape[0]
    tile_expert, tile_row, ends = _tiles([len(x_txt), len(x_vis)], x.device)
    h = torch.empty(m, f, dtype=x.dtype, device=x.device)
    grid = (len(tile_expert), triton.cdiv(f, BLOCK_N))
    kernel[grid](x, g_t.weight, g_v.weight, u_t.weight, u_v.weight, h, tile_expert, tile_row, ends, d, f,
                          SWIGLU=True, BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K)
    out = torch.empty(m, d, dtype=x.dtype, device=x.device)
    grid = (len(tile_expert), triton.cdiv(d, BLOCK_N))
    kernel[grid](h, d_t.weight, d_v.weight, d_t.weight, d_v.weight, out, tile_expert, tile_row, ends, f, d,
                          SWIGLU=False, BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K)
    return out
