"""The decoder's static KV cache."""
from __future__ import annotations

import torch

from monovl.config import LLMConfig


class KVCache:
    """Static, pre-allocated keys and values for every layer: (L, B, n_kv, S, Dh) each."""

    def __init__(self, cfg: LLMConfig, batch: int, max_len: int, dtype, device=None):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int,
               rows: torch.Tensor | None = None):
        """Write k, v (B, n_kv, T, Dh) at positions (B, T) of cache rows `rows` (B,) (default: rows 0..B-1);
        return those rows' first kv_len cached positions (B, n_kv, kv_len, Dh)."""
        at = torch.arange(k.shape[0], device=k.device) if rows is None else rows
        self.k[layer][at[:, None], :, input_pos] = k.transpose(1, 2)  # in place; indexed view (B, T, n_kv, Dh)
        self.v[layer][at[:, None], :, input_pos] = v.transpose(1, 2)
        k, v = self.k[layer, :, :, :kv_len], self.v[layer, :, :, :kv_len]  # every row: a view, no copy
        return (k, v) if rows is None else (k.index_select(0, rows), v.index_select(0, rows))
