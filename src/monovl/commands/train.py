"""`monovl train RECIPE.toml [--set section.key=value ...]` (`monovl.train`), single process or under torchrun."""
from __future__ import annotations

import errno
import os
import sys


def cmd_train(args) -> int:
    from monovl.train import parallel
    from monovl.checks import write_failed
    from monovl.train.loop import NonFiniteLossError, train
    from monovl.train.recipe import load_recipe
    from monovl.train.state import StateWriteError

    cfg = load_recipe(args.recipe, args.set)
    try:
        result = train(cfg, force=args.force)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except OSError as e:  # a state write names its folder; a write elsewhere in the run folder (metrics) may not
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) and not isinstance(e, StateWriteError):
            raise write_failed(e, cfg.run.out_dir, "run folder") from None
        raise
    finally:
        parallel.shutdown_distributed()
    if os.environ.get("RANK", "0") != "0":
        return 0
    model = f"; model {result['final']}" if result["final"] else ""
    if result.get("already_done"):
        print(f"already finished: {result['step']} steps; run folder {result['run_dir']}{model} (nothing to do)")
    else:
        print(f"trained {result['step']} steps ({result['skipped']} skipped); run folder {result['run_dir']}{model}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train from a TOML recipe (single process or under torchrun)")
    p.add_argument("recipe", help="recipe file, e.g. recipes/tiny/s1_1.toml")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe value (repeatable), e.g. --set optim.lr=1e-4")
    p.add_argument("--force", action="store_true",
                   help="resume a run folder whose training states were made under another recipe (default: refuse)")
    p.set_defaults(func=cmd_train)
