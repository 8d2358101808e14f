"""What `train` checks before it builds anything: that the run folder can be written, whether the run is already
finished, and whether an earlier run in the folder used another recipe (resuming it under the new one silently
would mix two recipes in one run and overwrite its `recipe.json`)."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from monovl.checks import OutputError, writable_dir
from monovl.train.recipe import TrainConfig, to_dict
from monovl.train.state import PREFIX, list_states

log = logging.getLogger(__name__)
# Keys that change how a run is watched or where it runs, not what it computes: resuming under new values is fine.
HARMLESS = {"run.progress", "run.tensorboard", "run.threads", "run.device", "run.log_every", "run.resume"}


class RecipeChangedError(ValueError):
    """The run folder holds a run of another recipe; the message says what changed."""


def recipe_changes(old: dict, new: dict) -> list[str]:
    """"section.key: old → new" for every value that differs (the HARMLESS keys excepted)."""
    out = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section, {}), new.get(section, {})
        for key in sorted(set(a) | set(b)):
            name = f"{section}.{key}"
            if name not in HARMLESS and a.get(key, "(unset)") != b.get(key, "(unset)"):
                out.append(f"{name}: {a.get(key, '(unset)')!r} → {b.get(key, '(unset)')!r}")
    return out


def check_recipe(cfg: TrainConfig, run_dir: Path, force: bool) -> None:
    """Refuse (unless `force`) to resume the training states in `run_dir` under a recipe other than theirs."""
    old_file = run_dir / "recipe.json"
    if not cfg.run.resume or not list_states(run_dir / "checkpoints") or not old_file.is_file():
        return
    try:
        old = json.loads(old_file.read_text())
    except (OSError, ValueError) as e:
        raise RecipeChangedError(f"{old_file} cannot be read ({e}), so this run's recipe is unknown: pass --force "
                                 "to resume anyway") from None
    changes = recipe_changes(old, to_dict(cfg))
    if changes and not force:
        raise RecipeChangedError(
            f"{run_dir} holds a run of another recipe ({'; '.join(changes)}); resuming would continue it under the "
            "new values and overwrite its recipe.json. Use another run.out_dir, set run.resume=false to start "
            "over, or pass --force to resume under the new recipe")
    if changes:
        log.warning("resuming %s under a changed recipe (--force): %s", run_dir, "; ".join(changes))


def finished(cfg: TrainConfig, run_dir: Path) -> dict | None:
    """The result of a run that is already done (its last state at schedule.steps, its export written), else None."""
    states = list_states(run_dir / "checkpoints") if cfg.run.resume else []
    if not states or int(states[-1].name[len(PREFIX):]) != cfg.schedule.steps:
        return None
    final = run_dir / "final"
    if cfg.checkpoint.export and not (final / "config.json").is_file():
        return None
    return {"step": cfg.schedule.steps, "losses": [], "skipped": None, "run_dir": run_dir,
            "final": final if cfg.checkpoint.export else None, "already_done": True}


def preflight(cfg: TrainConfig, rank: int, force: bool = False) -> dict | None:
    """Rank 0 checks the run folder (writable, same recipe); returns the result when the run is already done."""
    run_dir = Path(cfg.run.out_dir)
    if rank == 0:
        writable_dir(run_dir, "run folder")
        check_recipe(cfg, run_dir, force)
    return finished(cfg, run_dir)


def check_space(run_dir: Path, n_params: int, n_trainable: int) -> None:
    """A clear error now, rather than a torn write later, when the disk cannot hold one training state (fp32
    weights and AdamW's two moments) and the exported model."""
    need = 4 * n_params + 8 * n_trainable + 4 * n_params
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise OutputError(f"the run folder {run_dir} has {free / 2**20:.1f} MiB free; a training state and the "
                          f"exported model need about {need / 2**20:.1f} MiB")
