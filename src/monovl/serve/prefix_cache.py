"""The engine's prefix cache: keys and values of finished requests, found again by the longest common prefix of
token ids, least recently used first out, bounded in bytes.

A follow-up turn of a chat re-sends the whole conversation (images included); its prompt starts with the
prompt and answer of the previous turn, whose keys and values this cache still holds, so only the new tokens are
prefilled. A match never ends inside an image tile (the tile's features are computed as a whole).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class Entry:
    ids: torch.Tensor  # (n,) token ids whose keys and values are held
    k: torch.Tensor  # (L, n_kv, n, Dh)
    v: torch.Tensor

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class PrefixCache:
    def __init__(self, max_bytes: int, image_token_id: int | None, tokens_per_tile: int, min_tokens: int = 16):
        self.max_bytes, self.min_tokens = max_bytes, min_tokens
        self.image_token_id, self.per_tile = image_token_id, max(tokens_per_tile, 1)
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # least recently used first
        self.nbytes = 0
        self.hits = 0
        self.tokens_reused = 0
        self._next = 0

    def _usable(self, ids: torch.Tensor, n: int) -> int:
        """n, moved back to the start of the image tile it would end inside."""
        if self.image_token_id is None:
            return n
        visual = ids == self.image_token_id
        before = int(visual[:n].sum())
        partial = before % self.per_tile
        return int(visual.nonzero()[before - partial]) if partial else n

    def lookup(self, ids: torch.Tensor) -> tuple[Entry | None, int]:
        """The entry sharing the longest prefix with `ids` (leaving at least one token to prefill) and that
        prefix's length; (None, 0) below `min_tokens`."""
        best, best_n = None, 0
        for key, e in self.entries.items():
            n = min(len(e.ids), len(ids) - 1)
            same = int((e.ids[:n] == ids[:n]).long().cumprod(0).sum()) if n > 0 else 0
            if same > best_n:
                best, best_n, best_key = e, same, key
        best_n = self._usable(ids, best_n) if best is not None else 0
        if best is None or best_n < self.min_tokens:
            return None, 0
        self.entries.move_to_end(best_key)
        self.hits += 1
        self.tokens_reused += best_n
        return best, best_n

    def insert(self, ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep copies of k, v (L, n_kv, n, Dh) for ids (n,); entries that are prefixes of ids go, then the least
        recently used until the cache fits. An entry larger than the whole budget is not kept."""
        entry = Entry(ids.clone(), k.clone(), v.clone())
        if entry.nbytes > self.max_bytes or len(ids) < self.min_tokens:
            return
        for key, e in list(self.entries.items()):
            if len(e.ids) <= len(ids) and torch.equal(e.ids, ids[: len(e.ids)]):
                self._drop(key)
        while self.entries and self.nbytes + entry.nbytes > self.max_bytes:
            self._drop(next(iter(self.entries)))
        self.entries[self._next] = entry
        self._next += 1
        self.nbytes += entry.nbytes

    def _drop(self, key: int) -> None:
        self.nbytes -= self.entries.pop(key).nbytes
