"""The training loss at the head: logits only where a label is.

Position t predicts token t+1, so the hidden state at t is kept iff `labels[t+1] != -100`. Image tokens and
prompts carry no label, so in S1.x (~256 image tokens, a short caption) and S2 (only the answers) most rows
never reach the final norm and the (D → V) head: their logits, and that GEMM, are never computed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100  # label of a position without loss


def labelled_hidden(x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, T, D) final hidden states, labels (B, T) → (hidden states that predict a label (N, D), labels (N,)),
    in row-major order of the predicting position."""
    target = labels[:, 1:].reshape(-1)  # (B*(T-1),): the label each position predicts
    keep = (target != IGNORE).nonzero().squeeze(1)  # (N,)
    h = x[:, :-1].reshape(-1, x.shape[-1]).index_select(0, keep)  # (N, D)
    return h, target.index_select(0, keep)


def head_loss(x: torch.Tensor, labels: torch.Tensor, norm, head, chunk: int = 0) -> torch.Tensor:
    """Summed next-token cross-entropy (fp32) of x (B, T, D) against labels (B, T), through `norm` then `head`
    at the labelled positions only. `chunk` > 0: at most `chunk` rows of logits at a time, each chunk
    recomputed in the backward pass, so the logits never take more than chunk × V floats; same sum."""
    h, y = labelled_hidden(x, labels)  # (N, D), (N,)

    def ce(h_part: torch.Tensor, y_part: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(norm(h_part)).float(), y_part, reduction="sum")  # logits (n, V)

    if chunk <= 0 or h.shape[0] <= chunk:
        return ce(h, y)
    parts = [checkpoint(ce, h[i:i + chunk], y[i:i + chunk], use_reentrant=False)
             for i in range(0, h.shape[0], chunk)]
    return torch.stack(parts).sum()
