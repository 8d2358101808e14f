"""monovl: run, train, serve and evaluate monolithic multimodal LLMs of the Mono-InternVL family.

The names below are imported on first use, so `import monovl` (and `monovl --help`) does not load torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "CheckpointError": "monovl.checkpoint", "load_model": "monovl.checkpoint", "save_model": "monovl.checkpoint",
    "Conversation": "monovl.conversation", "chat": "monovl.conversation",
    "generate": "monovl.generation", "stream_generate": "monovl.generation",
    "ImageError": "monovl.images", "load_image": "monovl.images", "load_pixel_values": "monovl.images",
    "build_inputs": "monovl.inputs", "ModelInputs": "monovl.inputs",
    "Tokenizer": "monovl.tokenizer",
}
__all__ = sorted([*_EXPORTS, "load"])


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'monovl' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def load(path=None, dtype=None, device=None, quantize=None):
    """(model, tokenizer) from a release-format folder; without `path`, the tiny model shipped with monovl.
    `quantize="int8"`: weight-only int8 linears, head and embeddings (activations stay in `dtype`)."""
    from monovl.checkpoint import load_model, model_dir
    from monovl.tokenizer import Tokenizer

    path = model_dir(path)
    return load_model(path, dtype=dtype, device=device, quantize=quantize), Tokenizer.from_dir(path)
