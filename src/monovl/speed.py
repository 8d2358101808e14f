"""`monovl bench`: prefill/decode speed against this machine's GEMM peak and read bandwidth, in one run.

Also times the official "dense blend" route (both experts on every token, logits for every position) on
the same weights and prompt, so the routed path's gain is a ratio measured side by side.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from monovl import generation
from monovl.model import MonoInternVL


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


class Machine:
    """This machine's fp32 (or `dtype`) GEMM peak — an n³ matmul — and read bandwidth — a streaming `sum` of a
    `gib` GiB fp32 tensor: the bytes a decode step must read, per second, the roofline that decode is reported
    against (a copy also writes, a GEMV also computes). `measure()` once per bench round keeps the best."""

    def __init__(self, n: int = 2048, gib: float = 1.0, dtype=torch.float32, device="cpu"):
        self.a, self.b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
        self.src = torch.ones(int(gib * 2**30) // 4, device=device)
        self.sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
        self.gemm_peak_gflops = self.bandwidth_gbs = 0.0

    def measure(self, repeat: int = 2) -> "Machine":
        n = self.a.shape[0]
        peak = 2 * n**3 / _best(lambda: (self.a @ self.b, self.sync()), repeat) / 1e9
        read = self.src.numel() * 4 / _best(lambda: (self.src.sum(), self.sync()), repeat) / 1e9
        self.gemm_peak_gflops = max(self.gemm_peak_gflops, peak)
        self.bandwidth_gbs = max(self.bandwidth_gbs, read)
        return self


@dataclass
class Flops:
    prefill: float  # routed prefill, logits for the last position only
    dense: float  # official blend: both FFNs on every token, logits for every position
    decode_bytes: float  # bytes read per decode step (text weights + KV cache)


def count(model: MonoInternVL, n_text: int, num_visual: int, tiles: int, decode_kv: int,
          weight_bytes: float = 4.0) -> Flops:
    """FLOPs of the routed prefill and the dense blend; bytes a decode step reads (text weights at
    `weight_bytes` each — 1 for int8 —, the KV cache in the model's float dtype)."""
    c, t = model.cfg.llm, n_text + num_visual
    d, hd, heads = c.hidden_size, c.head_dim, c.num_attention_heads
    attn_params = d * (heads + 2 * c.num_key_value_heads) * hd + heads * hd * d
    ffn_params = 3 * d * c.intermediate_size
    per_layer = 2 * t * (attn_params + ffn_params) + 4 * heads * hd * t * (t + 1) / 2  # linears + causal attn
    vis = 0.0
    if model.cfg.vision is not None and tiles:
        v = model.cfg.vision
        grid = (v.image_size // v.patch_size) ** 2
        c4 = v.hidden_size * int(1 / model.cfg.downsample_ratio) ** 2
        vis = 2 * tiles * (grid * 3 * v.patch_size**2 * v.hidden_size + grid // 4 * (c4 * d + d * d))
    head = 2 * d * c.vocab_size
    prefill = c.num_hidden_layers * per_layer + vis + head
    dense = prefill + c.num_hidden_layers * 2 * t * ffn_params * (1 if c.visual_ffn_experts else 0) + head * (t - 1)
    if c.visual_attention_experts:
        dense += c.num_hidden_layers * 2 * t * attn_params
    float_bytes = model.language_model.model.norm.weight.element_size()
    weights = c.num_hidden_layers * (attn_params + ffn_params) + c.vocab_size * d  # linears and head
    small = c.num_hidden_layers * 2 * d + 2 * d  # norms, one embedding row
    kv = c.num_hidden_layers * 2 * c.num_key_value_heads * hd * decode_kv
    return Flops(prefill, dense, weights * weight_bytes + (small + kv) * float_bytes)


def bench_prompt(model: MonoInternVL, tiles: int, text_tokens: int, seed: int = 0):
    """A synthetic prompt: 4 text tokens, `tiles` tiles of random pixels, the rest text → (ids (1, T), pixels)."""
    p = model.language_model.model.norm.weight
    num_visual = model.cfg.num_image_token * tiles if model.cfg.vision is not None and tiles else 0
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, min(model.cfg.llm.vocab_size, 90000), (text_tokens,), generator=g)
    visual = torch.full((num_visual,), model.cfg.image_token_id if num_visual else 0)
    ids = torch.cat([text[:4], visual, text[4:]])[None].to(p.device)  # (1, T)
    size = model.cfg.vision.image_size if num_visual else 0
    pv = torch.randn(tiles, 3, size, size, generator=g).to(p.device, p.dtype) if num_visual else None
    return ids, pv


class _Route:
    """One model's timed steps on the bench prompt: prefill (TTFT), decode, and a follow-up turn of `extra` text
    tokens prefilled after the KV of turn 1 (prompt + answer), i.e. with the prefix reused."""

    def __init__(self, model, ids, pv, decode_tokens: int, extra: int):
        self.model, self.ids, self.pv, self.n, self.extra = model, ids, pv, decode_tokens, extra
        self.device = ids.device
        self.sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        self.t = ids.shape[1]
        self.cache = model.new_cache(1, self.t + decode_tokens + extra + 1)
        self.turn2_ids = bench_prompt(model, 0, extra, seed=1)[0]  # (1, extra) text tokens

    def _prefill(self, ids, pv, start: int):
        pos = torch.arange(start, start + ids.shape[1], device=self.device)[None]
        last = torch.tensor([ids.shape[1] - 1], device=self.device)
        tok = generation.prefill(self.model, generation.embed_prompt(self.model, ids, pv), self.cache, pos, last)
        tok = tok.argmax(-1)
        self.sync()
        return tok

    def prefill(self):
        return self._prefill(self.ids, self.pv, 0)

    def decode(self, tok):
        for i in range(self.n):
            pos = torch.tensor([self.t + i], device=self.device)
            tok = generation.decode_one_token(self.model, tok, pos, self.cache).argmax(-1)
        self.sync()

    def turn2(self):
        return self._prefill(self.turn2_ids, None, self.t + self.n)

    def modular_prefill(self, encoder):
        """The modular route's TTFT: the tiles through `encoder` (a full ViT + projector), then the same LLM with
        every token on the text weights (a modular MLLM has no visual experts)."""
        lm = self.model.language_model
        x = lm.embed_tokens(self.ids)  # (1, T, D)
        mask = self.ids == self.model.cfg.image_token_id  # (1, T)
        x = x.masked_scatter(mask[..., None], encoder(self.pv).to(x.dtype))
        pos = torch.arange(self.t, device=self.device)[None]
        tok = lm(x, None, input_pos=pos, cache=self.cache, logits_at=torch.tensor([self.t - 1], device=self.device))
        self.sync()
        return tok.argmax(-1)


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def run_bench(model: MonoInternVL, *, tiles: int = 1, text_tokens: int = 32, decode_tokens: int = 16,
              repeat: int = 3, dense: bool = True, quantized: MonoInternVL | None = None,
              modular: torch.nn.Module | None = None, machine: Machine | None = None) -> dict:
    """Time prefill (TTFT), decode, a reused-prefix turn 2, the dense blend and, given `quantized` (the same
    weights in int8), its TTFT and decode, and given `modular` (a `ModularEncoder`) the modular route's TTFT, on one
    synthetic prompt; with `machine`, its GEMM peak and read bandwidth too. Rounds interleave the routes so that
    all see the same machine noise, and the best round of each counts. Times in seconds."""
    ids, pv = bench_prompt(model, tiles, text_tokens)
    routes = {"": _Route(model, ids, pv, decode_tokens, text_tokens)}
    if quantized is not None:
        routes["_int8"] = _Route(quantized, ids, pv, decode_tokens, text_tokens)
    best: dict[str, float] = {}

    def keep(key, seconds):
        best[key] = min(best.get(key, float("inf")), seconds)

    with torch.inference_mode():
        for r in routes.values():
            r.prefill()  # warm-up
        for _ in range(repeat):
            if machine is not None:
                machine.measure()
            for suffix, r in routes.items():
                start = time.perf_counter()
                tok = r.prefill()
                keep("ttft_s" + suffix, time.perf_counter() - start)
                keep("decode_s" + suffix, _timed(r.decode, tok) / max(decode_tokens, 1))
                if not suffix:
                    keep("turn2_ttft_s", _timed(r.turn2))
            if dense:
                keep("dense_ttft_s", _timed(lambda: (model(ids, pv, dense=True), routes[""].sync())))
            if modular is not None:
                keep("modular_ttft_s", _timed(routes[""].modular_prefill, modular))
    num_visual = ids.shape[1] - text_tokens
    f = count(model, text_tokens, num_visual, tiles, ids.shape[1] + decode_tokens // 2)
    out = dict(tokens=ids.shape[1], visual_tokens=num_visual, prefill_gflops=f.prefill / best["ttft_s"] / 1e9,
               decode_tok_s=1 / best["decode_s"], decode_gbs=f.decode_bytes / best["decode_s"] / 1e9,
               decode_bytes=f.decode_bytes, **best)
    if dense:
        out.update(dense_gflops=f.dense / best["dense_ttft_s"] / 1e9,
                   dense_over_routed=best["dense_ttft_s"] / best["ttft_s"])
    if modular is not None:
        out.update(mono_over_modular=best["ttft_s"] / best["modular_ttft_s"])
    if quantized is not None:
        f8 = count(model, text_tokens, num_visual, tiles, ids.shape[1] + decode_tokens // 2, weight_bytes=1.0)
        out.update(decode_tok_s_int8=1 / best["decode_s_int8"], decode_bytes_int8=f8.decode_bytes,
                   decode_gbs_int8=f8.decode_bytes / best["decode_s_int8"] / 1e9)
    return out


def token_agreement(reference: MonoInternVL, model: MonoInternVL, ids: torch.Tensor, pixel_values=None,
                    n: int = 64) -> float:
    """Share of `reference`'s n greedy tokens (no stop) that `model` predicts too, each given the same prefix
    (the reference's tokens so far): a per-token agreement that one early difference cannot cascade into."""
    with torch.inference_mode():
        new = generation.generate(reference, ids, pixel_values, max_new_tokens=n)  # (1, n)
        full = torch.cat([ids, new[:, :-1]], dim=1)  # (1, T + n - 1)
        t = ids.shape[1]
        logits = model(full, pixel_values)[:, t - 1:]  # (1, n, V): the predictions of the n new tokens
    return float((logits.argmax(-1) == new).float().mean())
