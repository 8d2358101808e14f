"""Delta tuning: which parameters train in each stage, declared as data and applied in one function.

Patterns are `fnmatch` patterns over `named_parameters()` names (the checkpoint's names). EViP / EViP++:
S1.1 and S1.2 train the patch embedding, `mlp1` and the visual experts with the whole LLM frozen, so a
text-only prompt keeps bit-identical logits; S1.3 also trains the LLM's attention; S2 trains everything.
`s1.3++` is S1.3 for a model with attention experts (EViP++, v1.5) as the tiny recipes train it: visual tokens
already have trainable attention of their own, so the text weights stay frozen and text-only logits stay
bit-identical through S1.3 too (our choice; the paper's exact S1.3 trainable set for v1.5 is not confirmed here).
`full` (everything, from the start) is the ablation that breaks the invariant.

Stages are written with InternLM2's names; for a Qwen/Llama model (`self_attn`, `mlp`) they are translated by
`HF_NAMES` (its experts are `self_attn_ve`, `mlp_ve`).
"""
from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence

import torch
from torch import nn

from monovl.model.decoder import RMSNorm

log = logging.getLogger(__name__)

_VISUAL = ["vision_model.*", "mlp1.*", "*.feed_forward_ve.*", "*.attention_ve.*"]
STAGES: dict[str, list[str]] = {
    "s1.1": _VISUAL,  # concept learning
    "s1.2": _VISUAL,  # semantic learning
    "s1.3": _VISUAL + ["*.attention.*"],  # alignment learning: + the LLM's (text) attention
    "s1.3++": _VISUAL,  # alignment learning with attention experts: the text weights stay frozen
    "s2": ["*"],  # instruction tuning
    "full": ["*"],  # ablation: full tuning from S1.1 on
}
# Patterns that may match nothing: attention experts exist only in v1.5 (EViP++) models.
OPTIONAL_PATTERNS = frozenset({"*.attention_ve.*", "*.self_attn_ve.*"})
HF_NAMES = {".feed_forward_ve.": ".mlp_ve.", ".attention_ve.": ".self_attn_ve.", ".attention.": ".self_attn."}


def _for_layout(patterns: list[str], names: list[str]) -> list[str]:
    """A stage's InternLM2-named patterns, translated to Qwen/Llama names when the model uses those."""
    if not any(".self_attn." in n for n in names):
        return patterns
    out = []
    for pattern in patterns:
        for internlm2, hf in HF_NAMES.items():
            pattern = pattern.replace(internlm2, hf)
        out.append(pattern)
    return out


def trainable_patterns(stage_or_patterns: str | Sequence[str]) -> list[str]:
    """The fnmatch patterns of the trainable parameters: a stage's (`STAGES`) or the given list, checked."""
    if isinstance(stage_or_patterns, str):
        if stage_or_patterns not in STAGES:
            raise ValueError(f"unknown stage {stage_or_patterns!r}; choose one of {sorted(STAGES)} "
                             "or pass a list of parameter-name patterns")
        return list(STAGES[stage_or_patterns])
    patterns = list(stage_or_patterns)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"expected a stage name or a non-empty list of pattern strings, got {stage_or_patterns!r}")
    return patterns


def freeze(model: nn.Module, stage_or_patterns: str | Sequence[str]) -> nn.Module:
    """Train exactly the parameters whose names match one of the stage's patterns; freeze the rest."""
    names = [n for n, _ in model.named_parameters()]
    patterns = trainable_patterns(stage_or_patterns)
    if isinstance(stage_or_patterns, str):
        patterns = _for_layout(patterns, names)
    unmatched = [p for p in patterns
                 if p not in OPTIONAL_PATTERNS and not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise ValueError(f"freeze pattern(s) {unmatched} match no parameter of this model "
                         f"(names look like {names[:3]} …)")
    if stage_or_patterns == "s1.3++" and not any(".attention_ve." in n or ".self_attn_ve." in n for n in names):
        raise ValueError("stage s1.3++ keeps the text attention frozen, which is for models with attention experts "
                         "(EViP++); this model has none: use stage s1.3")
    counts = {True: 0, False: 0}
    tensors = {True: 0, False: 0}
    for name, p in model.named_parameters():
        train = any(fnmatch.fnmatchcase(name, pat) for pat in patterns)
        p.requires_grad_(train)
        counts[train] += p.numel()
        tensors[train] += 1
    log.info("freeze(%s): trainable %d parameters in %d tensors, frozen %d in %d tensors",
             stage_or_patterns if isinstance(stage_or_patterns, str) else "custom",
             counts[True], tensors[True], counts[False], tensors[False])
    return model


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters that require gradients, in `named_parameters()` order."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _no_decay_names(model: nn.Module) -> set[str]:
    """Norm scales, biases, embeddings and position/class embeddings: no weight decay."""
    out = set()
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for p_name, _ in module.named_parameters(recurse=False):
            full = prefix + p_name
            if (isinstance(module, (nn.LayerNorm, RMSNorm, nn.Embedding)) or p_name == "bias"
                    or p_name in ("position_embedding", "class_embedding")):
                out.add(full)
    return out


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups over the trainable parameters only: decayed weights, then the no-decay rest."""
    no_decay = _no_decay_names(model)
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if name in no_decay else decay).append(p)
    if not decay and not plain:
        raise ValueError("the model has no trainable parameters; call freeze(model, stage) with a stage that "
                         "trains something")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def adamw(groups: list[dict], **kwargs) -> torch.optim.AdamW:
    """torch's AdamW over `groups`: the fused implementation (one kernel over every tensor; on this project's 2-core
    CPU ~8× faster than the per-tensor loop that torch picks by default off CUDA) where every parameter is a plain
    tensor on CPU or CUDA, the foreach one otherwise (FSDP2's sharded DTensor parameters)."""
    params = [p for g in groups for p in g["params"]]
    fused = all(type(p.data) is torch.Tensor and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, **kwargs, **({"fused": True} if fused else {"foreach": True}))
