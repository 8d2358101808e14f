"""`monovl plot RUN_DIR`: loss and learning-rate curves of a training run (`monovl.train.metrics.plot`)."""
from __future__ import annotations


def cmd_plot(args) -> int:
    from monovl.train.metrics import plot

    path = plot(args.run_dir, args.out)
    print(f"wrote {path}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("plot", help="draw the loss and learning-rate curves of a training run to a PNG")
    p.add_argument("run_dir", help="a `monovl train` output folder (with metrics.jsonl)")
    p.add_argument("--out", help="PNG path (default RUN_DIR/curves.png)")
    p.set_defaults(func=cmd_plot)
