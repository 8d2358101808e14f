"""Training states: periodic, atomic save (temporary folder, fsync, rename), keep the last K, resume.

A state is `RUN_DIR/checkpoints/step_00000042/` holding `model.pt` (full state dict), `optim.pt` (full
optimizer state, keyed by parameter name) and `trainer.pt` (step, scheduler, data position, RNG states,
counters). Under FSDP the full dicts are gathered to rank 0, which writes them; on resume rank 0 reads
them and they are broadcast. A folder appears under its final name only once completely written, so a
run killed at any moment leaves either the previous states or the new one, never a torn one.
"""
from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

log = logging.getLogger(__name__)
PREFIX = "step_"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_file(obj, path: Path) -> None:
    with path.open("wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def list_states(ckpt_dir) -> list[Path]:
    """Complete training states in `ckpt_dir`, oldest first (temporary folders are ignored)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir()
                  if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit())


def save_state(ckpt_dir, step: int, model, optimizer, trainer: dict, keep_last: int) -> Path | None:
    """Write the state of `step` atomically and delete all but the newest `keep_last`. Collective under FSDP."""
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=full)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=full)
    if _rank() != 0:
        return None
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"{PREFIX}{step:08d}"
    tmp = ckpt_dir / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    _save_file(model_sd, tmp / "model.pt")
    _save_file(optim_sd, tmp / "optim.pt")
    _save_file({**trainer, "step": step, "rng": rng_state()}, tmp / "trainer.pt")
    _fsync_dir(tmp)
    if final.exists():  # a state of the same step from an earlier attempt
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(ckpt_dir)
    for old in list_states(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old)
    log.info("saved training state %s", final)
    return final


def load_state(path, model, optimizer) -> dict:
    """Restore model and optimizer from the state folder `path`; return its trainer dict (RNG restored)."""
    path = Path(path)
    rank0 = _rank() == 0
    bcast = _distributed()
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=bcast)
    model_sd = torch.load(path / "model.pt", map_location="cpu", weights_only=True) if rank0 or not bcast else {}
    set_model_state_dict(model, model_sd, options=opts)
    optim_sd = torch.load(path / "optim.pt", map_location="cpu", weights_only=True) if rank0 or not bcast else {}
    # strict=False: a trainable parameter that never received a gradient (the unused CLS embedding) has no state
    set_optimizer_state_dict(model, optimizer, optim_sd, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=bcast, strict=False))
    trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
    set_rng_state(trainer["rng"])
    log.info("resumed from %s (step %d)", path, trainer["step"])
    return trainer
