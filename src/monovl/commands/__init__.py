"""One module per `monovl` subcommand (named in `monovl.cli.COMMANDS`): its flags, `register` and handler.

The handlers are the only code that prints; the library they call logs.
"""
from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser, *, required: bool = False, default_help: str | None = None) -> None:
    """--model, --dtype and --device, parsed by `monovl.checkpoint.model_dir` / `parse_dtype` and `monovl.load`."""
    from monovl.checkpoint import DTYPES

    if required:
        p.add_argument("--model", required=True, help="checkpoint folder")
    else:
        p.add_argument("--model", help=default_help or "checkpoint folder (default: the shipped tiny model)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="weight dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", help="torch device, e.g. cuda:0 (default: cpu)")


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """The sampling flags of `monovl.generation.stream_generate`."""
    p.add_argument("--max-new-tokens", type=int, default=512, help="answer budget in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0 = all")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = none")
    p.add_argument("--seed", type=int, help="sampling seed (default: unseeded)")


def generation_kwargs(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)
