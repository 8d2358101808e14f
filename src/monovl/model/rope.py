"""Rotary position embeddings: cos/sin tables for positions (plain, linear, dynamic-NTK or Llama 3 scaling) and
their application to queries and keys (rotate_half convention)."""
from __future__ import annotations

import math

import torch

from monovl.config import LLMConfig


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3 rope scaling: long wavelengths divided by `factor`, short ones kept, the band between blended."""
    factor, low, high = float(scaling["factor"]), float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    context = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    blend = ((context / wavelen - low) / (high - low)).clamp(0.0, 1.0)  # 0 at the low-frequency edge, 1 at the high
    blended = (1 - blend) * inv_freq / factor + blend * inv_freq
    out = torch.where(wavelen > context / low, inv_freq / factor, blended)
    return torch.where(wavelen < context / high, inv_freq, out)


def rope_cos_sin(cfg: LLMConfig, input_pos: torch.Tensor, kv_len: int, dtype: torch.dtype):
    """cos/sin (B, T, Dh) for positions (B, T): plain, linear, dynamic-NTK (InternLM2) or llama3 scaling."""
    dim, base, scale = cfg.head_dim, cfg.rope_theta, 1.0
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        scale = factor
    elif kind == "dynamic" and kv_len > cfg.max_position_embeddings:
        base = base * (factor * kv_len / cfg.max_position_embeddings - (factor - 1)) ** (dim / (dim - 2))
    elif kind not in (None, "default", "linear", "dynamic", "llama3"):
        raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: linear, dynamic, llama3)")
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, device=input_pos.device).float() / dim)  # (Dh/2,)
    if kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    freqs = (input_pos.float() / scale)[..., None] * inv_freq  # (B, T, Dh/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, T, Dh)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, Dh); cos/sin (B, T, Dh); rotate_half convention."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]
