"""InternLM2 decoder with Mono-InternVL's modality-routed visual experts.

A plain InternLM2 layer is `x + Attention(norm(x))` then `h + FFN(norm(h))`. Mono-InternVL adds, per layer,
`feed_forward_ve` (and in v1.5 `attention_ve.{wqkv,wo}`): a token whose id is <IMG_CONTEXT> runs through the
visual weights, every other token through the text weights. `Routing` is computed once per forward and each
token goes through exactly one expert (gather → expert → scatter); `dense=True` reproduces the official blend
(both experts on every token, mixed by the mask) for benchmarks and tests.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from monovl.config import LLMConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(cfg: LLMConfig, input_pos: torch.Tensor, kv_len: int, dtype: torch.dtype):
    """cos/sin (B, T, Dh) for positions (B, T), with InternLM2's linear and dynamic-NTK scaling."""
    dim, base, scale = cfg.head_dim, cfg.rope_theta, 1.0
    kind = (cfg.rope_scaling or {}).get("type")
    factor = float((cfg.rope_scaling or {}).get("factor", 1.0))
    if kind == "linear":
        scale = factor
    elif kind == "dynamic" and kv_len > cfg.max_position_embeddings:
        base = base * (factor * kv_len / cfg.max_position_embeddings - (factor - 1)) ** (dim / (dim - 2))
    elif kind not in (None, "linear", "dynamic"):
        raise ValueError(f"unsupported rope_scaling type {kind!r} (InternLM2 defines 'linear' and 'dynamic')")
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, device=input_pos.device).float() / dim)  # (Dh/2,)
    freqs = (input_pos.float() / scale)[..., None] * inv_freq  # (B, T, Dh/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, T, Dh)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, Dh); cos/sin (B, T, Dh); rotate_half convention."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


@dataclass
class Routing:
    """Which tokens are visual, computed once per forward and reused by every layer."""
    visual_mask: torch.Tensor  # (B, T) bool
    vis_idx: torch.Tensor | None  # flat indices of visual tokens; None when there are none
    txt_idx: torch.Tensor | None  # flat indices of text tokens; None when there are none
    dense: bool = False

    @classmethod
    def build(cls, visual_mask: torch.Tensor, dense: bool = False) -> "Routing":
        flat = visual_mask.reshape(-1)
        num_visual = int(flat.sum())  # the only host sync of the routing, once per forward
        vis = flat.nonzero().squeeze(1) if num_visual else None
        txt = (~flat).nonzero().squeeze(1) if num_visual < flat.numel() else None
        return cls(visual_mask, vis, txt, dense)

    def __call__(self, x: torch.Tensor, text_fn, visual_fn) -> torch.Tensor:
        """Apply `text_fn` to text tokens and `visual_fn` to visual tokens of x (B, T, Din) → (B, T, Dout)."""
        if visual_fn is None or self.vis_idx is None:
            return text_fn(x)  # text-only fast path
        if self.dense:
            return torch.where(self.visual_mask[..., None], visual_fn(x), text_fn(x))
        if self.txt_idx is None:
            return visual_fn(x)
        b, t, _ = x.shape
        flat = x.reshape(b * t, -1)  # (B*T, Din)
        y_txt = text_fn(flat.index_select(0, self.txt_idx))  # (Nt, Dout)
        y_vis = visual_fn(flat.index_select(0, self.vis_idx))  # (Nv, Dout)
        out = y_txt.new_empty(b * t, y_txt.shape[-1])
        out.index_copy_(0, self.txt_idx, y_txt).index_copy_(0, self.vis_idx, y_vis)
        return out.view(b, t, -1)  # (B, T, Dout)


class FeedForward(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.w1 = nn.Linear(d, f, bias=cfg.bias)
        self.w3 = nn.Linear(d, f, bias=cfg.bias)
        self.w2 = nn.Linear(f, d, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class AttentionProjections(nn.Module):
    """`wqkv` packs q, k, v per kv-head group: output rows (n_kv, n_rep + 2, Dh)."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.wqkv = nn.Linear(cfg.hidden_size, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, bias=cfg.bias)
        self.wo = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.bias)


class KVCache:
    """Static, pre-allocated keys and values for every layer: (L, B, n_kv, S, Dh) each."""

    def __init__(self, cfg: LLMConfig, batch: int, max_len: int, dtype, device=None):
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int,
               rows: torch.Tensor | None = None):
        """Write k, v (B, n_kv, T, Dh) at positions (B, T) of cache rows `rows` (B,) (default: rows 0..B-1);
        return those rows' first kv_len cached positions."""
        if rows is None:
            idx = input_pos[:, None, :, None].expand_as(k)  # (B, n_kv, T, Dh)
            self.k[layer].scatter_(2, idx, k)
            self.v[layer].scatter_(2, idx, v)
            return self.k[layer, :, :, :kv_len], self.v[layer, :, :, :kv_len]
        self.k[layer][rows[:, None], :, input_pos] = k.transpose(1, 2)  # in place; indexed view (B, T, n_kv, Dh)
        self.v[layer][rows[:, None], :, input_pos] = v.transpose(1, 2)
        return (self.k[layer, :, :, :kv_len].index_select(0, rows),  # (B, n_kv, kv_len, Dh)
                self.v[layer, :, :, :kv_len].index_select(0, rows))


@dataclass
class ForwardContext:
    """What every layer of one forward shares."""
    routing: Routing
    cos: torch.Tensor  # (B, T, Dh)
    sin: torch.Tensor
    input_pos: torch.Tensor | None  # (B, T), with a cache
    kv_len: int
    mask: torch.Tensor | None  # (B, 1, T, kv_len) bool; None = plain causal
    cache: KVCache | None
    cache_rows: torch.Tensor | None = None  # (B,) cache rows of the batch rows; None = 0..B-1


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.attention = AttentionProjections(cfg)
        self.attention_ve = AttentionProjections(cfg) if cfg.visual_attention_experts else None
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.feed_forward = FeedForward(cfg)
        self.feed_forward_ve = FeedForward(cfg) if cfg.visual_ffn_experts else None

    def forward(self, x: torch.Tensor, ctx: ForwardContext, layer: int) -> torch.Tensor:
        ve = self.attention_ve
        ve_wqkv, ve_wo = (ve.wqkv, ve.wo) if ve is not None else (None, None)
        qkv = ctx.routing(self.attention_norm(x), self.attention.wqkv, ve_wqkv)  # (B, T, (H+2Hkv)*Dh)
        o = self._attend(qkv, ctx, layer)  # (B, T, H*Dh)
        x = x + ctx.routing(o, self.attention.wo, ve_wo)
        return x + ctx.routing(self.ffn_norm(x), self.feed_forward, self.feed_forward_ve)

    def _attend(self, qkv: torch.Tensor, ctx: ForwardContext, layer: int) -> torch.Tensor:
        c = self.cfg
        b, t, _ = qkv.shape
        n_rep = c.num_heads // c.num_kv_heads
        qkv = qkv.view(b, t, c.num_kv_heads, n_rep + 2, c.head_dim)  # (B, T, Hkv, n_rep+2, Dh)
        q = qkv[:, :, :, :n_rep].reshape(b, t, c.num_heads, c.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        k = qkv[:, :, :, -2].transpose(1, 2)  # (B, Hkv, T, Dh)
        v = qkv[:, :, :, -1].transpose(1, 2)  # (B, Hkv, T, Dh)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        if ctx.cache is not None:
            k, v = ctx.cache.update(layer, ctx.input_pos, k, v, ctx.kv_len, ctx.cache_rows)  # (B, Hkv, S, Dh)
        if n_rep > 1:
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)  # (B, H, S, Dh)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, is_causal=ctx.mask is None,
                                           scale=1.0 / math.sqrt(c.head_dim))  # (B, H, T, Dh)
        return o.transpose(1, 2).reshape(b, t, c.num_heads * c.head_dim)


class InternLM2Model(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class InternLM2ForCausalLM(nn.Module):
    """`model.*` + untied `output`; parameter names equal the checkpoint's."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.model = InternLM2Model(cfg)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor, visual_mask: torch.Tensor | None = None, *, input_pos=None,
                cache: KVCache | None = None, logits_at: torch.Tensor | None = None, dense: bool = False,
                cache_rows: torch.Tensor | None = None):
        """x: embeddings (B, T, D). input_pos (B, T): positions (default 0..T-1); with a `cache`, where to write;
        without one, several samples packed in a row, each starting at position 0 (attention stays within each);
        cache_rows (B,): the cache row (slot) of each batch row, for serving a subset of the cache's rows.
        logits_at (B,): one position per row to compute logits for; None = every position. → (B, T', V)."""
        b, t, _ = x.shape
        if visual_mask is None:
            visual_mask = torch.zeros(b, t, dtype=torch.bool, device=x.device)
        packed = input_pos is not None  # without a cache, explicit positions mean packed samples
        if input_pos is None:
            input_pos = torch.arange(t, device=x.device).expand(b, t)  # (B, T)
        mask, kv_len = None, t
        if cache is None and packed:
            seg = (input_pos == 0).cumsum(-1)  # (B, T): a new sample starts wherever its position is 0
            same = seg[:, :, None] == seg[:, None, :]  # (B, T, T)
            mask = (same & torch.ones(t, t, dtype=torch.bool, device=x.device).tril())[:, None]  # (B, 1, T, T)
        if cache is not None:
            kv_len = int(input_pos.max()) + 1  # one host sync per forward
            if kv_len > cache.max_len:
                raise ValueError(f"sequence of {kv_len} tokens exceeds the KV cache ({cache.max_len})")
            keys = torch.arange(kv_len, device=x.device)
            mask = keys[None, None, None, :] <= input_pos[:, None, :, None]  # (B, 1, T, S)
        cos, sin = rope_cos_sin(self.cfg, input_pos, kv_len, x.dtype)
        ctx = ForwardContext(Routing.build(visual_mask, dense), cos, sin, input_pos, kv_len, mask, cache, cache_rows)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, ctx, i)
        if logits_at is not None:
            x = x[torch.arange(b, device=x.device), logits_at][:, None]  # (B, 1, D)
        return self.output(self.model.norm(x))  # (B, T', V)
