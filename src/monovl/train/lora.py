"""LoRA on any named linear modules, merged back into plain weights for export.

`apply_lora(model, ["*.attention.wqkv", "*.feed_forward_ve.*"])` swaps each matched `nn.Linear` for a
`LoRALinear` that keeps the frozen base `weight` (and `bias`) under the same names and adds trainable
`lora_A` (r, in) and `lora_B` (out, r): y = x Wᵀ + b + (alpha / r) · dropout(x) Aᵀ Bᵀ. B starts at zero, so
the model's outputs are unchanged at first. `merge_lora` folds (alpha / r) · B A into W and restores the
`nn.Linear`s, so the state dict has exactly the release keys again. InternLM2 module names:
`attention.wqkv`, `attention.wo`, `feed_forward.w1/w2/w3`, `feed_forward_ve.*`, `attention_ve.*`.
Apply it after `freeze(model, stage)`: it freezes the wrapped base weights itself and leaves the rest as the
stage set them; a later `freeze` call must list `*.lora_A` / `*.lora_B` among its patterns to keep them training.
"""
from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update; callable wherever the linear was."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter: same name in the state dict, frozen
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.scale = rank, alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)  # (..., out)
        return F.linear(x, self.weight, self.bias) + self.scale * update

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with W + scale · B A (computed in float32 or better, stored in W's dtype)."""
        w = self.weight
        acc = torch.promote_types(w.dtype, torch.float32)
        delta = (self.lora_B.detach().to(acc) @ self.lora_A.detach().to(acc)) * self.scale  # (out, in)
        with torch.device("meta"):
            lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        lin.weight = nn.Parameter((w.detach().to(acc) + delta).to(w.dtype), requires_grad=w.requires_grad)
        if self.bias is not None:
            lin.bias = self.bias
        return lin

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scale={self.scale}"


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def apply_lora(model: nn.Module, targets: Sequence[str], rank: int = 8, alpha: float = 16,
               dropout: float = 0.0) -> nn.Module:
    """Wrap every `nn.Linear` whose module name matches a pattern in `targets` (fnmatch) with LoRA."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be ≥ 1, got {rank}")
    if isinstance(targets, str):
        targets = [targets]
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    matched: dict[str, nn.Linear] = {}
    for pat in targets:
        hits = [n for n in linears if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear) and fnmatch.fnmatchcase(n, pat)]
            hint = " (already wrapped by an earlier apply_lora)" if wrapped else ""
            raise ValueError(f"LoRA target {pat!r} matches no nn.Linear module{hint}; linear names look like "
                             f"{list(linears)[:3]} …")
        matched.update((n, linears[n]) for n in hits)
    for name, lin in matched.items():
        _replace(model, name, LoRALinear(lin, rank, alpha, dropout))
    added = sum(m.lora_A.numel() + m.lora_B.numel() for m in model.modules() if isinstance(m, LoRALinear))
    log.info("LoRA rank %d on %d linear modules: %d trainable LoRA parameters", rank, len(matched), added)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight and restore plain nn.Linear modules."""
    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name, m in wrapped:
        _replace(model, name, m.merged())
    log.info("merged LoRA into %d linear modules", len(wrapped))
    return model
