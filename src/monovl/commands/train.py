"""`monovl train RECIPE.toml [--set section.key=value ...]` (`monovl.train`), single process or under torchrun."""
from __future__ import annotations

import os
import sys


def cmd_train(args) -> int:
    from monovl.train import parallel
    from monovl.train.loop import NonFiniteLossError, train
    from monovl.train.recipe import load_recipe

    cfg = load_recipe(args.recipe, args.set)
    try:
        result = train(cfg)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    finally:
        parallel.shutdown_distributed()
    if os.environ.get("RANK", "0") == "0":
        print(f"trained {result['step']} steps ({result['skipped']} skipped); run folder {result['run_dir']}"
              + (f"; model {result['final']}" if result["final"] else ""))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train from a TOML recipe (single process or under torchrun)")
    p.add_argument("recipe", help="recipe file, e.g. recipes/tiny/s1_1.toml")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe value (repeatable), e.g. --set optim.lr=1e-4")
    p.set_defaults(func=cmd_train)
