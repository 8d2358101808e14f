"""Training: monolithize an LLM, freeze per stage, LoRA, data, loops and recipes.

`loss(model, batch)` (the summed training loss, `monovl.train.objective`) is imported on first use.
"""
from __future__ import annotations

import importlib


def __getattr__(name: str):
    if name != "loss":
        raise AttributeError(f"module 'monovl.train' has no attribute {name!r}")
    return importlib.import_module("monovl.train.objective").loss
