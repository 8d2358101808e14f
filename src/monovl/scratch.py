"""New models from scratch: random initialisation (the training loop's random presets, the speed benchmark,
`monovl demo --reproduce` and the tests build models this way)."""
from __future__ import annotations

import torch

from monovl.model import MonoInternVL


def random_init_(model: MonoInternVL, seed: int = 0, std: float = 0.02) -> MonoInternVL:
    """Weights ~ N(0, std²) (biases 0), norm and LayerNorm scales 1, drawn from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name == "mlp1.0.weight":
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(std))
    return model


def new_model(cfg, seed: int = 0, device="cpu") -> MonoInternVL:
    """A randomly initialised model of config `cfg`, built without a throw-away default initialisation."""
    with torch.device("meta"):
        model = MonoInternVL(cfg)
    model = model.to_empty(device=device)
    model.language_model.tie_weights()  # `to_empty` gives a tied head its own tensor
    return random_init_(model, seed).eval()


def random_model(cfg, seed: int = 0, device="cpu") -> MonoInternVL:
    """`new_model` for a config without a tokenizer: unless set, <IMG_CONTEXT> gets a stand-in id, where the
    nine InternVL tokens appended to a vocabulary put it (vocab_size - 7)."""
    if cfg.image_token_id is None:
        cfg.image_token_id = cfg.llm.vocab_size - 7
    return new_model(cfg, seed, device)
