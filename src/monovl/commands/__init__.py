"""One module per `monovl` subcommand (named in `monovl.cli.COMMANDS`): its flags, `register` and handler.

The handlers are the only code that prints; the library they call logs.
"""
from __future__ import annotations

import argparse

from monovl.checks import number  # noqa: F401 (the commands' numeric flag type)


def add_model_args(p: argparse.ArgumentParser, *, required: bool = False, default_help: str | None = None) -> None:
    """--model, --dtype and --device, parsed by `monovl.checkpoint.model_dir` / `parse_dtype` and `monovl.load`."""
    from monovl.checkpoint import DTYPES

    if required:
        p.add_argument("--model", required=True, help="checkpoint folder")
    else:
        p.add_argument("--model", help=default_help or "checkpoint folder (default: the shipped tiny model)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="weight dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", help="torch device, e.g. cuda:0 (default: cpu)")
    p.add_argument("--quantize", choices=["int8"], help="weight-only int8 (per-output-channel) for the decoder's "
                   "linears, head and embeddings; activations stay in --dtype (default: none)")


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """The sampling flags of `monovl.generation.stream_generate`."""
    p.add_argument("--max-new-tokens", type=number(int, 1), default=256,
                   help="answer budget in tokens (the answer ends earlier at the end-of-turn token)")
    p.add_argument("--temperature", type=number(float, 0), default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=number(float, 0, 1, low_open=True), default=1.0, help="nucleus sampling mass")
    p.add_argument("--top-k", type=number(int, 0), default=0, help="sample among the k likeliest tokens; 0 = all")
    p.add_argument("--repetition-penalty", type=number(float, 0, low_open=True), default=1.0, help="1 = none")
    p.add_argument("--seed", type=number(int, -(2**63), 2**63 - 1), help="sampling seed (default: unseeded)")


def generation_kwargs(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)
