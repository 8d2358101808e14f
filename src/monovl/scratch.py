"""New models from scratch: random initialisation, and a small random checkpoint for trying monovl out.

The random checkpoint is what `monovl chat` runs when no model is given and no trained tiny model is
installed: it exercises the whole pipeline (tokenizer, tiling, experts, cache, streaming) but its answers
are meaningless.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from monovl.checkpoint import save_model
from monovl.config import preset
from monovl.model import MonoInternVL
from monovl.tokenizer import build_bpe_tokenizer

log = logging.getLogger(__name__)


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
    return random_init_(model.to_empty(device=device), seed).eval()


def random_model(cfg, seed: int = 0, device="cpu") -> MonoInternVL:
    """`new_model` for a config without a tokenizer: unless set, <IMG_CONTEXT> gets a stand-in id, where the
    nine InternVL tokens appended to a vocabulary put it (vocab_size - 7)."""
    if cfg.image_token_id is None:
        cfg.image_token_id = cfg.llm.vocab_size - 7
    return new_model(cfg, seed, device)


SAMPLE_TEXT = """A red circle sits above a blue square. The green triangle is left of the yellow star.
How many shapes are in the picture? There are three shapes: two circles and one square.
What colour is the large star? The large star is purple. Describe the image in detail.
The image shows a small orange square in the top right corner and a white circle in the centre.
Answer the question using a single word or phrase. Please answer yes or no. Yes. No.
0 1 2 3 4 5 6 7 8 9 10 11 12 plus minus equals one two three four five six seven eight nine ten."""


def write_random_checkpoint(path, preset_name: str = "debug", seed: int = 0) -> Path:
    """Write a randomly initialised release-format checkpoint with a small BPE tokenizer to `path`."""
    path = Path(path)
    tokenizer = build_bpe_tokenizer([SAMPLE_TEXT] * 4, vocab_size=400, out_dir=path)
    cfg = preset(preset_name, vocab_size=tokenizer.vocab_size)
    cfg.image_token_id = tokenizer.img_context_id
    save_model(new_model(cfg, seed), path, tokenizer=tokenizer)
    log.info("wrote a random %s checkpoint to %s", preset_name, path)
    return path
