"""Parameter names are the checkpoint's: the state_dict keys of every preset and family, as recorded in
`state_dict_keys.json` (written from the release layout; a layer's keys stored once, with `{i}` for its index).

`python tests/test_state_dict_keys.py` rewrites the file: only for a deliberate change of the checkpoint format.
"""
import json
import re
from pathlib import Path

import pytest
import torch

from monovl.config import PRESETS, preset
from monovl.model import MonoInternVL
from monovl.model.quant import empty_quantized

RECORD = Path(__file__).with_name("state_dict_keys.json")
LAYER = re.compile(r"\.layers\.(\d+)\.")
FAMILY_FIELDS = {  # LLM fields by which a family's checkpoint names differ
    "internlm2-bias": dict(bias=True),
    "qwen2": dict(family="qwen2", qkv_bias=True),
    "qwen3": dict(family="qwen3", qk_norm=True, tie_word_embeddings=True),
    "llama": dict(family="llama"),
    "llama-biases": dict(family="llama", qkv_bias=True, o_bias=True, mlp_bias=True),
}


def _configs() -> dict:
    """name → ModelConfig: each preset, and each family as an LLM, monolithic, and with attention experts."""
    cfgs = {name: preset(name) for name in PRESETS}
    for name, fields in FAMILY_FIELDS.items():
        for variant, experts in (("llm", dict(visual_ffn_experts=False)), ("mono", {}),
                                 ("mono-v1.5", dict(visual_attention_experts=True))):
            cfg = preset("debug", **fields, **experts)
            if variant == "llm":
                cfg.vision = None
            cfgs[f"{name}-{variant}"] = cfg
    return cfgs


def _keys(cfg, quantized: bool = False) -> list[str]:
    with torch.device("meta"):
        model = MonoInternVL(cfg)
        if quantized:
            empty_quantized(model)
    return list(model.state_dict())


def _compress(keys: list[str]) -> dict:
    """The keys with layer 0's standing for every layer (`{i}`), and the number of layers."""
    layers = {int(m.group(1)) for k in keys if (m := LAYER.search(k))}
    shown = [LAYER.sub(".layers.{i}.", k) for k in keys if (m := LAYER.search(k)) is None or m.group(1) == "0"]
    return {"num_hidden_layers": len(layers), "keys": shown}


def _expand(record: dict) -> list[str]:
    keys, layer = [], [k for k in record["keys"] if "{i}" in k]
    for k in record["keys"]:
        if "{i}" not in k:
            keys.append(k)
        elif k == layer[0]:
            keys += [t.replace("{i}", str(i)) for i in range(record["num_hidden_layers"]) for t in layer]
    return keys


def _cases() -> dict:
    cfgs = _configs()
    return {**{name: (cfg, False) for name, cfg in cfgs.items()},
            "debug-int8": (cfgs["debug"], True), "qwen3-mono-v1.5-int8": (cfgs["qwen3-mono-v1.5"], True)}


@pytest.mark.parametrize("name", list(_cases()))
def test_state_dict_keys_are_the_recorded_ones(name):
    record = json.loads(RECORD.read_text())[name]
    assert _keys(*_cases()[name]) == _expand(record)


def test_the_record_covers_every_case():
    assert sorted(json.loads(RECORD.read_text())) == sorted(_cases())


if __name__ == "__main__":
    RECORD.write_text(json.dumps({n: _compress(_keys(*c)) for n, c in _cases().items()}, indent=1) + "\n")
