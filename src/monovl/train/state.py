"""Training states: periodic, atomic save (temporary folder, fsync, rename), keep the last K, resume.

A state is `RUN_DIR/checkpoints/step_00000042/` holding `model.pt` (full state dict), `optim.pt` (full
optimizer state, keyed by parameter name) and `trainer.pt` (step, scheduler, data position, RNG states,
counters). Under FSDP the full dicts are gathered to rank 0, which writes them; on resume rank 0 reads
them and they are broadcast. A folder appears under its final name only once completely written, so a
run killed at any moment leaves either the previous states or the new one, never a torn one.
"""
from __future__ import annotations

import json
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
TMP_PREFIX = ".tmp-"
FILES = ("model.pt", "optim.pt", "trainer.pt")


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
    tmp = ckpt_dir / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    try:  # a failed write (disk full, Ctrl-C) leaves no temporary folder behind; kill -9 is cleaned at start
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        _save_file(model_sd, tmp / "model.pt")
        _save_file(optim_sd, tmp / "optim.pt")
        _save_file({**trainer, "step": step, "rng": rng_state()}, tmp / "trainer.pt")
        sizes = {name: (tmp / name).stat().st_size for name in FILES}
        (tmp / "manifest.json").write_text(json.dumps({"step": step, "bytes": sizes}))
        _fsync_dir(tmp)
        if final.exists():  # a state of the same step from an earlier attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        raise StateWriteError(f"cannot write the training state {final.name} in {ckpt_dir}: {_cause(e, ckpt_dir)}; "
                              "the states written before it are kept") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(ckpt_dir)
    for old in list_states(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old)
    log.info("saved training state %s", final)
    return final


class StateWriteError(OSError):
    """A training state could not be written (disk full, read-only folder, ...); the message names the folder."""


def _cause(e: BaseException, folder: Path) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    free = shutil.disk_usage(folder).free
    return f"no space left on the disk ({free} bytes free)" if free < 2**24 else str(e).splitlines()[0]


def clean_temporary(ckpt_dir) -> list[Path]:
    """Delete the temporary folders that killed or failed writes left in `ckpt_dir` (those of processes that
    are still alive excepted); return them."""
    ckpt_dir = Path(ckpt_dir)
    removed = []
    for p in ckpt_dir.glob(f"{TMP_PREFIX}{PREFIX}*") if ckpt_dir.is_dir() else ():
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    if removed:
        log.warning("removed %d unfinished training state(s) left by an interrupted write: %s", len(removed),
                    ", ".join(p.name for p in removed))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def state_problem(path) -> str | None:
    """Why the state folder `path` cannot be resumed from (a file missing or of the wrong size, against the
    manifest written with it), or None. States written before manifests existed are only checked for files."""
    path = Path(path)
    missing = [name for name in FILES if not (path / name).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        return f"unreadable manifest.json ({e})"
    for name, size in manifest.get("bytes", {}).items():
        if (path / name).stat().st_size != size:
            return f"{name} has {(path / name).stat().st_size} bytes, {size} were written (truncated?)"
    return None


def newest_good_state(ckpt_dir) -> Path | None:
    """The newest state of `ckpt_dir` that `state_problem` finds nothing wrong with; each newer one that is
    broken is reported (a warning) and passed over."""
    for path in reversed(list_states(ckpt_dir)):
        problem = state_problem(path)
        if problem is None:
            return path
        log.warning("training state %s is damaged (%s): resuming from an older one", path, problem)
    return None


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
