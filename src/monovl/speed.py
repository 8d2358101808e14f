"""`monovl bench`: prefill/decode speed against this machine's GEMM peak and copy bandwidth, in one run.

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


def gemm_peak_gflops(n: int = 2048, repeat: int = 5, dtype=torch.float32, device="cpu") -> float:
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    _sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    return 2 * n**3 / _best(lambda: (a @ b, _sync()), repeat) / 1e9


def copy_bandwidth_gbs(mbytes: int = 512, repeat: int = 5, device="cpu") -> float:
    """STREAM-style copy: bytes read + bytes written per second."""
    src = torch.ones(mbytes * 2**20 // 4, device=device)
    dst = torch.zeros_like(src)  # touched, so page faults stay out of the timing
    _sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    return 2 * src.numel() * 4 / _best(lambda: (dst.copy_(src), _sync()), repeat) / 1e9


@dataclass
class Flops:
    prefill: float  # routed prefill, logits for the last position only
    dense: float  # official blend: both FFNs on every token, logits for every position
    decode_bytes: float  # bytes read per decode step (text weights + KV cache)


def count(model: MonoInternVL, n_text: int, num_visual: int, tiles: int, decode_kv: int) -> Flops:
    c, t = model.cfg.llm, n_text + num_visual
    d, hd = c.hidden_size, c.head_dim
    attn_params = d * (c.num_heads + 2 * c.num_kv_heads) * hd + c.num_heads * hd * d
    ffn_params = 3 * d * c.intermediate_size
    per_layer = 2 * t * (attn_params + ffn_params) + 4 * c.num_heads * hd * t * (t + 1) / 2  # linears + causal attn
    vis = 0.0
    if model.cfg.vision is not None and tiles:
        v = model.cfg.vision
        grid = (v.image_size // v.patch_size) ** 2
        c4 = v.hidden_size * int(1 / model.cfg.downsample_ratio) ** 2
        vis = 2 * tiles * (grid * 3 * v.patch_size**2 * v.hidden_size + grid // 4 * (c4 * d + d * d))
    head = 2 * d * c.vocab_size
    prefill = c.num_layers * per_layer + vis + head
    dense = prefill + c.num_layers * 2 * t * ffn_params * (1 if c.visual_ffn_experts else 0) + head * (t - 1)
    if c.visual_attention_experts:
        dense += c.num_layers * 2 * t * attn_params
    bytes_per = model.language_model.head.weight.element_size()
    weights = c.num_layers * (attn_params + ffn_params + 2 * d) + d + c.vocab_size * d + d
    kv = c.num_layers * 2 * c.num_kv_heads * hd * decode_kv
    return Flops(prefill, dense, (weights + kv) * bytes_per)


def run_bench(model: MonoInternVL, *, tiles: int = 1, text_tokens: int = 32, decode_tokens: int = 16,
              repeat: int = 3, dense: bool = True) -> dict:
    """Time prefill (TTFT), decode and the dense blend on a synthetic prompt; return the figures."""
    p = model.language_model.head.weight
    device, dtype = p.device, p.dtype
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    img = model.cfg.image_token_id
    num_visual = model.cfg.num_image_token * tiles if model.cfg.vision is not None and tiles else 0
    g = torch.Generator().manual_seed(0)
    text = torch.randint(3, min(model.cfg.llm.vocab_size, 90000), (text_tokens,), generator=g)
    visual = torch.full((num_visual,), img if num_visual else 0)
    ids = torch.cat([text[:4], visual, text[4:]])[None].to(device)  # (1, T)
    pv = torch.randn(tiles, 3, model.cfg.vision.image_size, model.cfg.vision.image_size, generator=g).to(
        device, dtype) if num_visual else None
    t = ids.shape[1]
    cache = model.new_cache(1, t + decode_tokens + 1)
    pos = torch.arange(t, device=device)[None]
    last = torch.tensor([t - 1], device=device)

    def prefill():
        tok = generation.prefill(model, generation.embed_prompt(model, ids, pv), cache, pos, last).argmax(-1)
        sync()
        return tok

    def decode(tok):
        for i in range(decode_tokens):
            tok = generation.decode_one_token(model, tok, torch.tensor([t + i], device=device), cache).argmax(-1)
        sync()

    def dense_blend():
        model(ids, pv, dense=True)
        sync()

    # Rounds interleave the routes so that both see the same machine noise; the best round of each counts.
    ttft = decode_s = dense_s = float("inf")
    with torch.inference_mode():
        prefill()  # warm-up
        for _ in range(repeat):
            start = time.perf_counter()
            tok = prefill()
            ttft = min(ttft, time.perf_counter() - start)
            decode_s = min(decode_s, _best(lambda: decode(tok), 1) / max(decode_tokens, 1))
            if dense:
                dense_s = min(dense_s, _best(dense_blend, 1))
    f = count(model, text_tokens, num_visual, tiles, t + decode_tokens // 2)
    dense_s = dense_s if dense else float("nan")
    return dict(tokens=t, visual_tokens=num_visual, ttft_s=ttft, prefill_tok_s=t / ttft,
                prefill_gflops=f.prefill / ttft / 1e9, decode_tok_s=1 / decode_s,
                decode_gbs=f.decode_bytes / decode_s / 1e9, dense_ttft_s=dense_s,
                dense_gflops=f.dense / dense_s / 1e9, dense_over_routed=dense_s / ttft)
