"""Model transformations for training, applied in a visible order: activation checkpointing, compile, FSDP2.

Each takes and returns the model and keeps parameter names unchanged (the composable APIs attach to the
modules instead of wrapping them), so freeze patterns, state dicts and the release export see the
checkpoint's names.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed._composable import checkpoint
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from monovl.model import MonoInternVL


def apply_ac(model: MonoInternVL) -> MonoInternVL:
    """Recompute every decoder layer's activations in the backward pass (non-reentrant checkpointing)."""
    for layer in model.language_model.model.layers:
        checkpoint(layer)
    return model


def apply_compile(model: MonoInternVL) -> MonoInternVL:
    """torch.compile each decoder layer in place (the layers are identical, so one compilation serves all)."""
    for layer in model.language_model.model.layers:
        layer.compile()
    return model


def init_distributed(device_type: str) -> tuple[int, int, DeviceMesh | None]:
    """(rank, world size, 1-D mesh) under torchrun (WORLD_SIZE > 1), else (0, 1, None)."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, None
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), world, init_device_mesh(device_type, (world,))


def apply_fsdp(model: MonoInternVL, mesh: DeviceMesh, param_dtype: torch.dtype | None = None) -> MonoInternVL:
    """FSDP2: shard each decoder layer, then the root (embeddings, vision part, head). Frozen parameters are
    sharded too. `param_dtype` (e.g. bf16) is the compute dtype; gradients are reduced in fp32."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in model.language_model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
