"""Random initialisation: the one rule for new weights (`init_parameters_`), used for whole models built from
scratch (`new_model`, `random_model`: the training loop's random presets, the memory estimate, the speed
benchmark, the reproduction's from-scratch stage 0) and for the parts `monolithize` adds to an LLM."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from monovl.model import MonoInternVL


@torch.no_grad()
def init_parameters_(named: Iterable[tuple[str, nn.Parameter]], generator: torch.Generator,
                     std: float = 0.02) -> None:
    """Weights ~ N(0, std²), biases 0, norm and LayerNorm scales (`*norm.weight`, `mlp1.0.weight`) 1; the
    weights drawn in the given order from `generator`."""
    for name, p in named:
        if name.endswith("norm.weight") or name == "mlp1.0.weight":
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).mul_(std))


def new_model(cfg, seed: int = 0, device="cpu") -> MonoInternVL:
    """A randomly initialised model of config `cfg`, built without a throw-away default initialisation."""
    with torch.device("meta"):
        model = MonoInternVL(cfg)
    model = model.to_empty(device=device)
    model.language_model.tie_weights()  # `to_empty` gives a tied head its own tensor
    init_parameters_(model.named_parameters(), torch.Generator().manual_seed(seed))
    return model.eval()


def random_model(cfg, seed: int = 0, device="cpu") -> MonoInternVL:
    """`new_model` for a config without a tokenizer: unless set, <IMG_CONTEXT> gets a stand-in id, where the
    nine InternVL tokens appended to a vocabulary put it (vocab_size - 7)."""
    if cfg.image_token_id is None:
        cfg.image_token_id = cfg.llm.vocab_size - 7
    return new_model(cfg, seed, device)
