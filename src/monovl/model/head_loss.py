"""The training loss at the head: logits only where a label is.

Position t predicts token t+1, so the hidden state at t is kept iff `labels[t+1] != -100`. Image tokens and
prompts carry no label, so in S1.x (~256 image tokens, a short caption) and S2 (only the answers) most rows
never reach the final norm and the (D → V) head: their logits, and that GEMM, are never computed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # label of a position without loss


def labelled_rows(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """labels (B, T) → (the positions that predict a label, as flat indices into B*T (N,), ascending; their
    labels (N,))."""
    target = F.pad(labels[:, 1:], (0, 1), value=IGNORE).reshape(-1)  # (B*T,): the label each position predicts
    rows = (target != IGNORE).nonzero().squeeze(1)  # (N,)
    return rows, target.index_select(0, rows)


def labelled_hidden(x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, T, D) final hidden states, labels (B, T) → (hidden states that predict a label (N, D), labels (N,)),
    in row-major order of the predicting position."""
    rows, target = labelled_rows(labels)
    return x.reshape(-1, x.shape[-1]).index_select(0, rows), target  # (N, D), (N,)


class _ChunkedHeadCE(torch.autograd.Function):
    """Summed cross-entropy of head(h) against y, `chunk` rows of logits at a time. The forward keeps no logits;
    the backward recomputes each chunk's, turns them into their gradient in place (softmax − one-hot) and adds
    that chunk's share into one weight-gradient buffer, so beyond the weight gradient (which any loss path needs
    when the head trains) the loss path holds chunk × V floats. Backward math in the weight's dtype."""

    @staticmethod
    def forward(ctx, h, weight, bias, y, head, chunk):
        ctx.head, ctx.chunk = head, chunk
        ctx.save_for_backward(h, weight, bias, y)
        h = h.detach()  # no graph is recorded here; a plain tensor keeps module hooks (e.g. FLOP counting) out
        return sum(F.cross_entropy(head(h[i:i + chunk]).float(), y[i:i + chunk], reduction="sum")
                   for i in range(0, h.shape[0], chunk))

    @staticmethod
    def backward(ctx, grad):
        h, weight, bias, y = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros_like(weight) if need_w else None
        gb = torch.zeros_like(bias) if need_b else None
        for i in range(0, h.shape[0], ctx.chunk):
            hi, yi = h[i:i + ctx.chunk].detach(), y[i:i + ctx.chunk]  # as in the forward
            d = ctx.head(hi).float().softmax(-1)  # (n, V) → d loss / d logits
            d[torch.arange(d.shape[0]), yi] -= 1
            d = (d * grad).to(weight.dtype)
            if need_h:
                gh[i:i + ctx.chunk] = (d @ weight).to(h.dtype)
            if need_w:
                gw.addmm_(d.t(), hi.to(weight.dtype))
            if need_b:
                gb += d.sum(0).to(gb.dtype)
        return gh, gw, gb, None, None, None


def head_loss(x: torch.Tensor, labels: torch.Tensor, norm, head, chunk: int = 0) -> torch.Tensor:
    """Summed next-token cross-entropy (fp32) of x (B, T, D) against labels (B, T), through `norm` then `head`
    (a linear layer) at the labelled positions only. `chunk` > 0: at most `chunk` rows of logits at a time,
    recomputed in the backward pass (`_ChunkedHeadCE`); same sum, same gradients to fp32 rounding."""
    return rows_loss(*labelled_hidden(x, labels), norm, head, chunk)


def rows_loss(h: torch.Tensor, y: torch.Tensor, norm, head, chunk: int = 0) -> torch.Tensor:
    """`head_loss` of hidden states h (N, D) that predict y (N,)."""
    if chunk <= 0 or h.shape[0] <= chunk:
        return F.cross_entropy(head(norm(h)).float(), y, reduction="sum")  # logits (N, V)
    return _ChunkedHeadCE.apply(norm(h), head.weight, head.bias, y, head, chunk)
