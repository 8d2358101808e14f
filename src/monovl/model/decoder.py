"""The Llama-style decoder (InternLM2, Qwen2/2.5, Qwen3, Llama) with Mono-InternVL's modality-routed experts.

The families differ only in declared places: `LAYOUTS` (module names: the checkpoint's own), packed (`PackedQKV`,
InternLM2) or separate (`SeparateQKV`) q/k/v projections, their biases, Qwen3's q/k norm, the rope variant
(`rope_cos_sin`, in `rope.py`) and a tied output head. A layer is `x + attention(norm(x))`, then `h + FFN(norm(h))`.
Mono-InternVL adds, per layer, a visual FFN expert (`feed_forward_ve` / `mlp_ve`; in v1.5 also `attention_ve` /
`self_attn_ve`): a token whose id is <IMG_CONTEXT> runs through the visual weights, every other token through the
text weights. The text module does the routing (`Attention`, `GatedFFN`), called with its `_ve` twin. `Routing` is
computed once per forward and each token goes through exactly one expert (gather → expert → scatter);
`dense=True` reproduces the official blend (both experts on every token, mixed by the mask) for benchmarks and tests.
With training labels, the last layer runs its queries, output projection and FFN only where a label is predicted
(`DecoderLayer.forward` with `rows`): no other position of its output reaches the loss.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from monovl.config import LLMConfig
from monovl.model import fused_experts
from monovl.model.head_loss import labelled_rows, rows_loss
from monovl.model.kv_cache import KVCache
from monovl.model.routing import Routing
from monovl.model.rope import apply_rope, rope_cos_sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


@dataclass(frozen=True)
class Layout:
    """A family's module names (the checkpoint's). A visual expert is named after its text module + `_ve`."""
    attention: str
    feed_forward: str
    attention_norm: str
    ffn_norm: str
    embed: str
    head: str


LAYOUTS = {
    "internlm2": Layout("attention", "feed_forward", "attention_norm", "ffn_norm", "tok_embeddings", "output"),
    "hf": Layout("self_attn", "mlp", "input_layernorm", "post_attention_layernorm", "embed_tokens", "lm_head"),
}


def layout(cfg: LLMConfig) -> Layout:
    return LAYOUTS["internlm2" if cfg.family == "internlm2" else "hf"]


@dataclass
class ForwardContext:
    """What every layer of one forward shares."""
    routing: Routing
    cos: torch.Tensor  # (B, T, Dh)
    sin: torch.Tensor
    input_pos: torch.Tensor | None  # (B, T), with a cache
    kv_len: int
    mask: torch.Tensor | None  # (B, 1, T, kv_len) bool, with a cache; None = causal (within each sample if packed)
    cache: KVCache | None
    cache_rows: torch.Tensor | None = None  # (B,) cache rows of the batch rows; None = 0..B-1
    segments: list[list[int]] | None = None  # packed samples: the lengths of each row's samples, in order


class GatedFFN(nn.Module):
    """The SiLU-gated FFN down(silu(gate x) · up x); a subclass holds the three linears under its family's names.
    Called with a forward's `ctx` and its `_ve` twin, each token runs through the FFN of its modality."""

    def linears(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        """(gate, up, down)."""
        raise NotImplementedError

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = self.linears()
        return down(F.silu(gate(x)) * up(x))

    def forward(self, x: torch.Tensor, ctx: ForwardContext | None = None,
                visual: GatedFFN | None = None) -> torch.Tensor:
        """x (B, T, D) → (B, T, D); without `ctx`, every token through this FFN."""
        if ctx is None:
            return self.ffn(x)
        r = ctx.routing
        if r.mixed and fused_experts.available(x, self, visual):
            return r.grouped(x, lambda xt, xv: fused_experts.grouped_ffn(xt, xv, self, visual))  # one kernel pair
        return r(x, self.ffn, visual.ffn if visual is not None else None)


class FeedForward(GatedFFN):
    """InternLM2's names: w2(silu(w1 x) · w3 x)."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.w1 = nn.Linear(d, f, bias=cfg.bias)
        self.w3 = nn.Linear(d, f, bias=cfg.bias)
        self.w2 = nn.Linear(f, d, bias=cfg.bias)

    def linears(self):
        return self.w1, self.w3, self.w2


class MLP(GatedFFN):
    """Qwen/Llama's names: down_proj(silu(gate_proj x) · up_proj x)."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(d, f, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(f, d, bias=cfg.mlp_bias)

    def linears(self):
        return self.gate_proj, self.up_proj, self.down_proj


class Attention(nn.Module):
    """Self-attention of layer `layer`: RoPE, grouped kv heads, the KV cache; a subclass holds the projections
    under its family's names (`qkv`, `split`, `out`). Called with its `_ve` twin, each token's projections are
    those of its modality."""

    def __init__(self, cfg: LLMConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer

    def forward(self, x: torch.Tensor, ctx: ForwardContext, visual: Attention | None = None) -> torch.Tensor:
        """x (B, T, D) → (B, T, D)."""
        q, k, v = self._project(x, ctx, visual)
        o = self._attend(q, k, v, ctx.mask, ctx.segments)  # (B, T, H*Dh)
        return ctx.routing(o, self.out, visual.out if visual is not None else None)

    def at_rows(self, x: torch.Tensor, ctx: ForwardContext, visual: Attention | None, rows: torch.Tensor,
                routing: Routing) -> torch.Tensor:
        """The output at the flat positions `rows` (N,) only → (N, D): keys and values from every position, queries
        and the output projection at `rows` (without a cache: causal, within each sample if packed; `routing` is that
        of the rows)."""
        q, k, v = self._project(x, ctx, visual)  # (B, H, T, Dh), (B, Hkv, T, Dh) × 2
        (b, h, t, dh), batch_row = q.shape, rows // x.shape[1]
        n_b = torch.bincount(batch_row, minlength=b)  # queries per batch row
        slot = torch.arange(len(rows), device=rows.device) - (n_b.cumsum(0) - n_b)[batch_row]
        pos = torch.zeros(b, int(n_b.max()), dtype=torch.long, device=rows.device)  # (B, n): padded with 0
        pos[batch_row, slot] = rows % t
        valid = torch.zeros_like(pos, dtype=torch.bool)
        valid[batch_row, slot] = True
        q = q.gather(2, pos[:, None, :, None].expand(-1, h, -1, dh))  # (B, H, n, Dh)
        mask = torch.arange(t, device=rows.device) <= pos[..., None]  # (B, n, T): causal
        if ctx.segments is not None:  # packed samples: and within the query's own sample
            sample = torch.stack([torch.arange(len(n), device=rows.device).repeat_interleave(
                torch.tensor(n, device=rows.device)) for n in ctx.segments])  # (B, T): each position's sample
            mask &= sample.gather(1, pos)[..., None] == sample[:, None, :]
        o = self._attend(q, k, v, mask[:, None])[valid]  # (N, H*Dh), in the order of rows
        return routing(o[None], self.out, visual.out if visual is not None else None)[0]

    def _project(self, x: torch.Tensor, ctx: ForwardContext, visual: Attention | None):
        """Queries, keys and values, rotated, cached: (B, H, T, Dh), (B, Hkv, S, Dh) × 2."""
        qkv = ctx.routing(x, self.qkv, visual.qkv if visual is not None else None)  # (B, T, (H+2Hkv)*Dh)
        q, k, v = self.split(qkv)  # (B, H, T, Dh), (B, Hkv, T, Dh) × 2
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer, ctx.input_pos, k, v, ctx.kv_len, ctx.cache_rows)  # (B, Hkv, S, Dh)
        return q, k, v

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                segments: list[list[int]] | None = None) -> torch.Tensor:
        """q (B, H, n, Dh) over k, v (B, Hkv, S, Dh) (each kv head serves H / Hkv query heads), `mask` (B, 1, n, S)
        or None (causal) → (B, n, H*Dh). With `segments` (packed samples' lengths), each sample attends causally
        within itself: the mask's result, without computing the blocks that it masks."""
        scale = 1.0 / math.sqrt(self.cfg.head_dim)
        if segments is not None:  # split, not sliced: the backward then joins the pieces' gradients in one copy
            o = torch.stack([torch.cat([F.scaled_dot_product_attention(qs[None], ks[None], vs[None], is_causal=True,
                                                                       scale=scale, enable_gqa=True)[0]
                                        for qs, ks, vs in zip(qb.split(n, 1), kb.split(n, 1), vb.split(n, 1))], 1)
                             for qb, kb, vb, n in zip(q, k, v, segments)])  # (B, H, n, Dh)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                               enable_gqa=True)
        return o.transpose(1, 2).flatten(2)  # (B, n, H*Dh)


class PackedQKV(Attention):
    """InternLM2: `wqkv` packs q, k, v per kv-head group: output rows (n_kv, n_rep + 2, Dh)."""

    def __init__(self, cfg: LLMConfig, layer: int):
        super().__init__(cfg, layer)
        d, h, hkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.wqkv = nn.Linear(d, (h + 2 * hkv) * hd, bias=cfg.bias)
        self.wo = nn.Linear(h * hd, d, bias=cfg.bias)

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        return self.wqkv(x)  # (B, T, (H+2Hkv)*Dh)

    def out(self, o: torch.Tensor) -> torch.Tensor:
        return self.wo(o)

    def split(self, qkv: torch.Tensor):
        """(B, T, (H+2Hkv)*Dh) → q (B, H, T, Dh), k, v (B, Hkv, T, Dh)."""
        c, (b, t, _) = self.cfg, qkv.shape
        h, hkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        qkv = qkv.view(b, t, hkv, h // hkv + 2, hd)  # (B, T, Hkv, n_rep+2, Dh)
        q = qkv[:, :, :, :-2].reshape(b, t, h, hd).transpose(1, 2)  # (B, H, T, Dh)
        return q, qkv[:, :, :, -2].transpose(1, 2), qkv[:, :, :, -1].transpose(1, 2)  # k, v: (B, Hkv, T, Dh)


class SeparateQKV(Attention):
    """Qwen/Llama: `q_proj`, `k_proj`, `v_proj`, `o_proj`; Qwen3 adds per-head `q_norm`, `k_norm` before RoPE."""

    def __init__(self, cfg: LLMConfig, layer: int):
        super().__init__(cfg, layer)
        d, h, hkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(d, h * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, hkv * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, hkv * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(h * hd, d, bias=cfg.o_bias)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps) if cfg.qk_norm else None

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., D) → [q | k | v] (..., (H+2Hkv)*Dh), q and k already normed (the norm is per token and head)."""
        q, k = self.q_proj(x), self.k_proj(x)
        if self.q_norm is not None:
            hd = self.cfg.head_dim
            q = self.q_norm(q.unflatten(-1, (-1, hd))).flatten(-2)  # normed over Dh per head
            k = self.k_norm(k.unflatten(-1, (-1, hd))).flatten(-2)
        return torch.cat([q, k, self.v_proj(x)], dim=-1)

    def out(self, o: torch.Tensor) -> torch.Tensor:
        return self.o_proj(o)

    def split(self, qkv: torch.Tensor):
        """(B, T, (H+2Hkv)*Dh) → q (B, H, T, Dh), k, v (B, Hkv, T, Dh)."""
        h, hkv, hd = self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim
        q, k, v = qkv.split([h * hd, hkv * hd, hkv * hd], -1)
        return (q.unflatten(-1, (h, hd)).transpose(1, 2),  # (B, H, T, Dh)
                k.unflatten(-1, (hkv, hd)).transpose(1, 2),  # (B, Hkv, T, Dh)
                v.unflatten(-1, (hkv, hd)).transpose(1, 2))


class DecoderLayer(nn.Module):
    """`x + attention(norm(x))`, then `h + FFN(norm(h))`; modules named per `Layout`, each called with its `_ve`
    twin (None without experts), which takes the visual tokens."""

    def __init__(self, cfg: LLMConfig, index: int):
        super().__init__()
        n = self.names = layout(cfg)
        attention, ffn = (PackedQKV, FeedForward) if cfg.family == "internlm2" else (SeparateQKV, MLP)
        self.add_module(n.attention, attention(cfg, index))
        self.add_module(n.attention + "_ve", attention(cfg, index) if cfg.visual_attention_experts else None)
        self.add_module(n.attention_norm, RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))
        self.add_module(n.ffn_norm, RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))
        self.add_module(n.feed_forward, ffn(cfg))
        self.add_module(n.feed_forward + "_ve", ffn(cfg) if cfg.visual_ffn_experts else None)

    def parts(self) -> tuple:
        """(attention norm, attention, its visual expert, FFN norm, FFN, its visual expert); an expert may be None."""
        n = self.names
        return tuple(getattr(self, name) for name in (n.attention_norm, n.attention, n.attention + "_ve",
                                                      n.ffn_norm, n.feed_forward, n.feed_forward + "_ve"))

    def forward(self, x: torch.Tensor, ctx: ForwardContext, rows: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D) → (B, T, D); given `rows` (N,), flat positions of x, the output there only (N, D): the training
        loss needs the last layer nowhere else, so the other positions only give their keys and values. (One entry
        point, so that FSDP's and checkpointing's hooks on `forward` see both.)"""
        attention_norm, attention, attention_ve, ffn_norm, ffn, ffn_ve = self.parts()
        if rows is None:
            x = x + attention(attention_norm(x), ctx, attention_ve)  # (B, T, D)
            return x + ffn(ffn_norm(x), ctx, ffn_ve)
        sub = replace(ctx, routing=ctx.routing.at_rows(rows))
        h = x.flatten(0, 1).index_select(0, rows)  # (N, D)
        h = h + attention.at_rows(attention_norm(x), ctx, attention_ve, rows, sub.routing)
        return h + ffn(ffn_norm(h)[None], sub, ffn_ve)[0]


class DecoderModel(nn.Module):
    """`model.*`: token embeddings, layers, final norm."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.add_module(layout(cfg).embed, nn.Embedding(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """`model.*` + the output head (`output`, or `lm_head`, tied to the embeddings when the config says so);
    parameter names equal the checkpoint's."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.model = DecoderModel(cfg)
        self.add_module(layout(cfg).head, nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False))
        self.tie_weights()

    @property
    def embed_tokens(self) -> nn.Embedding:
        return getattr(self.model, layout(self.cfg).embed)

    @property
    def head(self) -> nn.Linear:
        return getattr(self, layout(self.cfg).head)

    def tie_weights(self) -> None:
        """With `tie_word_embeddings`, make the head share the embedding matrix (again, after loading)."""
        if self.cfg.tie_word_embeddings and isinstance(self.head, nn.Linear):  # an int8 head keeps its own copy
            self.head.weight = self.embed_tokens.weight

    def forward(self, x: torch.Tensor, visual_mask: torch.Tensor | None = None, *, input_pos=None,
                cache: KVCache | None = None, logits_at: torch.Tensor | None = None, dense: bool = False,
                cache_rows: torch.Tensor | None = None, labels: torch.Tensor | None = None, loss_chunk: int = 0):
        """x: embeddings (B, T, D). input_pos (B, T): positions (default 0..T-1); with a `cache`, where to write;
        without one, several samples packed in a row, each starting at position 0 (attention stays within each);
        cache_rows (B,): the cache row (slot) of each batch row, for serving a subset of the cache's rows.
        logits_at (B,): one position per row to compute logits for; None = every position. → (B, T', V).
        labels (B, T) (-100: no loss): → the summed next-token loss instead, the head run only where a label is
        (`head_loss`; `loss_chunk` rows of logits at a time)."""
        b, t, _ = x.shape
        if visual_mask is None:
            visual_mask = torch.zeros(b, t, dtype=torch.bool, device=x.device)
        packed = input_pos is not None  # without a cache, explicit positions mean packed samples
        if input_pos is None:
            input_pos = torch.arange(t, device=x.device).expand(b, t)  # (B, T)
        mask, kv_len, segments = None, t, None
        if cache is None and packed:
            cuts = [{0, t} for _ in range(b)]  # a new sample starts wherever its position is 0
            for row, at in (input_pos == 0).nonzero().tolist():  # one host sync
                cuts[row].add(at)
            segments = [[e - s for s, e in itertools.pairwise(sorted(c))] for c in cuts]
        if cache is not None:
            kv_len = int(input_pos.max()) + 1  # one host sync per forward
            if kv_len > cache.max_len:
                raise ValueError(f"sequence of {kv_len} tokens exceeds the KV cache ({cache.max_len})")
            keys = torch.arange(kv_len, device=x.device)
            mask = keys[None, None, None, :] <= input_pos[:, None, :, None]  # (B, 1, T, S)
        cos, sin = rope_cos_sin(self.cfg, input_pos, kv_len, x.dtype)
        ctx = ForwardContext(Routing.build(visual_mask, dense), cos, sin, input_pos, kv_len, mask, cache, cache_rows,
                             segments)
        if labels is not None:  # the last layer only where a label is predicted
            rows, target = labelled_rows(labels)  # (N,), (N,)
            *body, last = self.model.layers
            for layer in body:
                x = layer(x, ctx)
            h = last(x, ctx, rows) if cache is None and len(rows) else last(x, ctx).flatten(0, 1)[rows]
            return rows_loss(h, target, self.model.norm, self.head, loss_chunk)  # () fp32
        for layer in self.model.layers:
            x = layer(x, ctx)
        if logits_at is not None:
            x = x[torch.arange(b, device=x.device), logits_at][:, None]  # (B, 1, D)
        return self.head(self.model.norm(x))  # (B, T', V)
