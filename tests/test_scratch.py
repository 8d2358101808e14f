"""The initialisation rule of models built from scratch."""
import math

import torch

from monovl.config import preset
from monovl.scratch import new_model


def _std(model, suffix: str) -> float:
    return float(dict(model.named_parameters())[suffix].detach().std())


def test_width_aware_initialisation_scales_with_fan_in():
    cfg = preset("tiny", vocab_size=1033)
    model = new_model(cfg, seed=3)
    lm = "language_model.model."
    assert abs(_std(model, lm + "tok_embeddings.weight") - 1.0) < 0.02  # token embeddings N(0, 1)
    for name, fan_in in ((lm + "layers.0.attention.wqkv.weight", 192), (lm + "layers.1.feed_forward.w2.weight", 512),
                         ("language_model.output.weight", 192), ("mlp1.1.weight", 4 * 768),
                         ("vision_model.embeddings.patch_embedding.weight", 3 * cfg.vision.patch_size ** 2)):
        assert abs(_std(model, name) * math.sqrt(3 * fan_in) - 1.0) < 0.05, name
    assert abs(_std(model, "vision_model.embeddings.position_embedding") - 0.02) < 0.002
    params = dict(model.named_parameters())
    assert torch.equal(params[lm + "norm.weight"], torch.ones(192))
    assert torch.equal(params["mlp1.1.bias"], torch.zeros(192))


def test_fixed_std_and_seed():
    a, b = new_model(preset("debug"), seed=1, std=0.02), new_model(preset("debug"), seed=1, std=0.02)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert abs(_std(a, "language_model.model.layers.0.feed_forward.w1.weight") - 0.02) < 0.003
    assert not torch.equal(new_model(preset("debug"), seed=2).language_model.output.weight,
                           new_model(preset("debug"), seed=1).language_model.output.weight)
