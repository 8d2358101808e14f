"""The training objective: `loss(model, batch)`, the summed next-token cross-entropy of a batch.

Every training path (the loop, its gradient accumulation and FSDP, the benchmark) calls this. The model
computes logits only at the positions that predict a label (`monovl.model.head_loss`), so the image tokens and
prompts of a batch never go through the (D → V) head.
"""
from __future__ import annotations

import torch


def loss(model, batch: dict, autocast_dtype: torch.dtype | None = None, chunk: int = 0) -> torch.Tensor:
    """Summed cross-entropy (fp32 scalar) over the label tokens of `batch`: `input_ids` (B, T), `labels` (B, T)
    with -100 where there is no loss (token t is predicted at position t-1), optional `pixel_values`
    (N, 3, S, S) and `input_pos` (B, T) for packed rows. `chunk` > 0 bounds the logits to `chunk` rows at a
    time (recomputed in the backward pass); the sum is the same."""
    device_type = batch["input_ids"].device.type
    with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        return model(batch["input_ids"], batch.get("pixel_values"), input_pos=batch.get("input_pos"),
                     labels=batch["labels"], loss_chunk=chunk)
