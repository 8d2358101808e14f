"""Random initialisation: the one rule for new weights (`init_parameters_`), used for whole models built from
scratch (`new_model`, `random_model`: the training loop's random presets, the memory estimate, the speed
benchmark, the reproduction's from-scratch stage 0) and for the parts `monolithize` adds to an LLM."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from monovl.model import MonoInternVL
from monovl.model.decoder import LAYOUTS


def width_std(name: str, shape: torch.Size) -> float:
    """The standard deviation that suits the layer's width: 1 for token embeddings, 1/√(3·fan_in) for a weight
    matrix or convolution (the variance of PyTorch's own default initialisation), 0.02 for position tables.
    A fixed 0.02 suits a 2,048-wide model; at the tiny model's width (192) it is ~4× too small, and attention
    then stays near uniform: the tiny 4-layer, 192-wide decoder learnt multi-query associative recall in 700
    updates with this rule and was still guessing after 1,500 with N(0, 0.02²) (same data and learning rate)."""
    if "position_embedding" in name or "class_embedding" in name:
        return 0.02
    if name.endswith(tuple(f"{layout.embed}.weight" for layout in LAYOUTS.values())):
        return 1.0
    return (3 * shape[1:].numel()) ** -0.5


@torch.no_grad()
def init_parameters_(named: Iterable[tuple[str, nn.Parameter]], generator: torch.Generator,
                     std: float | None = None) -> None:
    """Weights ~ N(0, std²) (`std` None: `width_std` per weight), biases 0, norm and LayerNorm scales
    (`*norm.weight`, `mlp1.0.weight`) 1; the weights drawn in the given order from `generator`."""
    for name, p in named:
        if name.endswith("norm.weight") or name == "mlp1.0.weight":
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            scale = width_std(name, p.shape) if std is None else std
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).mul_(scale))


def new_model(cfg, seed: int = 0, device="cpu", std: float | None = None) -> MonoInternVL:
    """A randomly initialised model of config `cfg` (`init_parameters_`), built without a throw-away default
    initialisation."""
    with torch.device("meta"):
        model = MonoInternVL(cfg)
    model = model.to_empty(device=device)
    model.language_model.tie_weights()  # `to_empty` gives a tied head its own tensor
    init_parameters_(model.named_parameters(), torch.Generator().manual_seed(seed), std)
    return model.eval()


def random_model(cfg, seed: int = 0, device="cpu") -> MonoInternVL:
    """`new_model` for a config without a tokenizer: unless set, <IMG_CONTEXT> gets a stand-in id, where the
    nine InternVL tokens appended to a vocabulary put it (vocab_size - 7)."""
    if cfg.image_token_id is None:
        cfg.image_token_id = cfg.llm.vocab_size - 7
    return new_model(cfg, seed, device)
