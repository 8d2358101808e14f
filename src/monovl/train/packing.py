"""Rendered training samples and their batching: greedy first-fit packing into rows of `seq_len` tokens.

A batch row holds whole samples one after another; `input_pos` restarts at 0 at every sample, which the
model (without a KV cache) turns into a block-diagonal causal mask, so packed samples stay independent.
Padding at the end of a row is one more run of positions from 0 with labels -100.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100  # label of a token that carries no loss


@dataclass
class Sample:
    """One rendered sample: token ids, labels (the id where loss applies, else IGNORE), image tiles."""

    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor | None = None  # (N, 3, S, S), tiles of its images in placeholder order
    source: str = ""
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_loss_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels[1:])


class Packer:
    """Fill `rows` rows of `seq_len` tokens; `pack=False` puts one sample per row.

    `add(sample)` places the sample in the first row with room (first fit) and returns True, or returns
    False when no row has room: the batch is then full and the caller emits it and starts a new one.
    """

    def __init__(self, rows: int, seq_len: int, pack: bool = True):
        if rows < 1 or seq_len < 2:
            raise ValueError(f"need rows >= 1 and seq_len >= 2, got {rows}, {seq_len}")
        self.rows, self.seq_len, self.pack = rows, seq_len, pack
        self.batch: list[list[Sample]] = [[] for _ in range(rows)]
        self._used = [0] * rows

    def add(self, sample: Sample) -> bool:
        if len(sample) > self.seq_len:
            raise ValueError(f"sample of {len(sample)} tokens exceeds seq_len={self.seq_len}")
        for r in range(self.rows):
            empty = not self.batch[r]
            if (empty or self.pack) and self._used[r] + len(sample) <= self.seq_len:
                self.batch[r].append(sample)
                self._used[r] += len(sample)
                return True
        return False

    def __len__(self) -> int:
        return sum(len(row) for row in self.batch)

    def take(self, pad_id: int) -> dict:
        """The collated batch (see `collate`); the packer is empty afterwards."""
        rows, self.batch, self._used = self.batch, [[] for _ in range(self.rows)], [0] * self.rows
        return collate(rows, self.seq_len if self.pack else None, pad_id)


def collate(rows: list[list[Sample]], seq_len: int | None, pad_id: int) -> dict:
    """Rows of samples → a training batch; `seq_len` None pads to the longest row.

    Keys: input_ids, labels, input_pos (B, T) long; pixel_values (N, 3, S, S) or None, the tiles of all
    images in the order their blocks appear (row-major); num_samples, num_loss_tokens, num_tokens.
    """
    rows = [row for row in rows if row] or [[]]
    width = seq_len or max(sum(len(s) for s in row) for row in rows)
    ids, labels, pos, tiles = [], [], [], []
    for row in rows:
        r_ids, r_labels, r_pos = [], [], []
        for s in row:
            if s.labels and s.labels[0] != IGNORE:
                raise ValueError("the first token of a sample must not carry a label (it has no predecessor)")
            r_ids += s.input_ids
            r_labels += s.labels
            r_pos += range(len(s))
            if s.pixel_values is not None:
                tiles.append(s.pixel_values)
        pad = width - len(r_ids)
        ids.append(r_ids + [pad_id] * pad)
        labels.append(r_labels + [IGNORE] * pad)
        pos.append(r_pos + list(range(pad)))  # padding: its own run of positions from 0
    labels_t = torch.tensor(labels, dtype=torch.long)  # (B, T)
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),  # (B, T)
        "labels": labels_t,
        "input_pos": torch.tensor(pos, dtype=torch.long),  # (B, T)
        "pixel_values": torch.cat(tiles) if tiles else None,  # (N, 3, S, S)
        "num_samples": sum(len(row) for row in rows),
        "num_loss_tokens": int((labels_t != IGNORE).sum()),
        "num_tokens": sum(len(s) for row in rows for s in row),
    }
