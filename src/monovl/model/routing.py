"""Routing by modality: which tokens go through the visual experts, computed once per forward."""
from __future__ import annotations

from dataclasses import dataclass

import torch


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
        if visual_fn is None:
            return text_fn(x)
        if self.vis_idx is None:
            return _with_idle(text_fn(x), visual_fn, x)  # text-only fast path
        if self.dense:
            return torch.where(self.visual_mask[..., None], visual_fn(x), text_fn(x))
        if self.txt_idx is None:
            return _with_idle(visual_fn(x), text_fn, x)
        b, t, _ = x.shape
        flat = x.reshape(b * t, -1)  # (B*T, Din)
        y_txt = text_fn(flat.index_select(0, self.txt_idx))  # (Nt, Dout)
        y_vis = visual_fn(flat.index_select(0, self.vis_idx))  # (Nv, Dout)
        out = y_txt.new_empty(b * t, y_txt.shape[-1])
        out.index_copy_(0, self.txt_idx, y_txt).index_copy_(0, self.vis_idx, y_vis)
        return out.view(b, t, -1)  # (B, T, Dout)

    def at_rows(self, rows: torch.Tensor) -> "Routing":
        """The routing of the flat positions `rows` (N,), as one row of N tokens."""
        return Routing.build(self.visual_mask.reshape(-1).index_select(0, rows)[None], self.dense)

    @property
    def mixed(self) -> bool:
        """Text and visual tokens both present, each to its own expert (not the dense blend)."""
        return self.vis_idx is not None and self.txt_idx is not None and not self.dense

    def grouped(self, x: torch.Tensor, fn) -> torch.Tensor:
        """Like calling it, for `fn(text rows, visual rows)` → both outputs grouped (Nt + Nv, D) in one call."""
        b, t, _ = x.shape
        flat = x.reshape(b * t, -1)  # (B*T, D)
        y = fn(flat.index_select(0, self.txt_idx), flat.index_select(0, self.vis_idx))  # (Nt + Nv, D)
        out = torch.empty_like(y)
        nt = len(self.txt_idx)
        out.index_copy_(0, self.txt_idx, y[:nt]).index_copy_(0, self.vis_idx, y[nt:])
        return out.view(b, t, -1)


def _with_idle(y: torch.Tensor, idle_fn, x: torch.Tensor) -> torch.Tensor:
    """y, plus (when gradients are recorded) `idle_fn` run on no rows as a zero: the expert without tokens in this
    forward stays in the autograd graph and gets a zero gradient, as in the dense reference, so that every process
    of a sharded (FSDP) run reduces the same gradients and the optimizer sees a zero, not a missing one."""
    return y + idle_fn(x[:0]).sum() if torch.is_grad_enabled() else y

