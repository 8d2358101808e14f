"""The Triton fused-expert kernel against the plain routed FFN, interpreted on CPU (TRITON_INTERPRET=1, fp32, tiny
shapes), in a subprocess so that the variable is set before Triton is imported. The slow tier, which `.ci/run` runs
with `monovl[triton]` installed; without Triton it fails, naming the install step."""
import importlib.util
import os
import subprocess
import sys

import pytest

CHECK = r"""
import torch
from monovl.config import preset
from monovl.model import fused_experts
from monovl.scratch import random_model

for family in ("internlm2", "qwen2"):
    cfg = preset("debug", family=family, hidden_size=48, intermediate_size=80)
    lm = random_model(cfg).language_model
    layer = lm.model.layers[0]
    ffn, ffn_ve = (layer.feed_forward, layer.feed_forward_ve) if family == "internlm2" else (layer.mlp, layer.mlp_ve)
    g = torch.Generator().manual_seed(0)
    for nt, nv in ((7, 21), (16, 1), (33, 17)):  # partial tiles, a single row, more than one tile per expert
        x_txt, x_vis = torch.randn(nt, 48, generator=g), torch.randn(nv, 48, generator=g)
        with torch.no_grad():
            got = fused_experts.grouped_ffn(x_txt, x_vis, ffn, ffn_ve)
            want = torch.cat([ffn(x_txt), ffn_ve(x_vis)])
        assert got.shape == want.shape, (got.shape, want.shape)
        err = float((got - want).abs().max())
        assert err <= 1e-5 * max(1.0, float(want.abs().max())), (family, nt, nv, err)
    x, visual = torch.randn(2, 9, 48, generator=g), torch.zeros(2, 9, dtype=torch.bool)
    visual[:, 2:6] = True
    with torch.no_grad():  # the decoder with every layer's FFN through the kernel, as on CUDA
        want = lm(x, visual)
        available, fused_experts.available = fused_experts.available, lambda x, ffn, ffn_ve: ffn_ve is not None
        got = lm(x, visual)
        fused_experts.available = available
    err = float((got - want).abs().max())
    assert err <= 1e-5 * max(1.0, float(want.abs().max())), (family, "decoder", err)
print("ok")
"""


@pytest.mark.slow
def test_fused_expert_kernel_equals_the_routed_ffn_interpreted():
    assert importlib.util.find_spec("triton") is not None, "Triton is not installed: pip install -e '.[test,triton]'"
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_the_fused_path_is_only_taken_on_cuda():
    import torch
    from monovl.config import preset
    from monovl.model import fused_experts
    from monovl.scratch import random_model
    layer = random_model(preset("debug")).language_model.model.layers[0]
    x = torch.zeros(2, 64)
    assert not fused_experts.available(x, layer.feed_forward, layer.feed_forward_ve)  # CPU: the routed path
    assert not fused_experts.available(x, layer.feed_forward, None)
