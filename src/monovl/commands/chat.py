"""`monovl chat`: one answer with --prompt, else an interactive session."""
from __future__ import annotations

import shlex
import sys

from monovl.commands import add_generation_args, add_model_args, generation_kwargs


def _answer(conv, question: str, images: list[str], gen: dict) -> None:
    for piece in conv.stream(question, images, **gen):
        print(piece, end="", flush=True)
    print()


def cmd_chat(args) -> int:
    from monovl import load
    from monovl.conversation import Conversation
    from monovl.checkpoint import parse_dtype

    model, tokenizer = load(args.model, dtype=parse_dtype(args.dtype), device=args.device)
    conv = Conversation(model, tokenizer, system=args.system, max_tiles=args.max_tiles)
    gen = generation_kwargs(args)
    if args.prompt is not None:
        _answer(conv, args.prompt, args.image, gen)
        return 0
    print("monovl chat: type a message; '/image PATH' attaches an image to your next message, "
          "'/reset' starts over, '/exit' or Ctrl-D quits.", file=sys.stderr)
    pending = list(args.image)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            conv = Conversation(model, tokenizer, system=args.system, max_tiles=args.max_tiles)
            pending = []
            continue
        if line.startswith("/image"):
            pending += shlex.split(line[len("/image"):])
            print(f"(attached: {', '.join(pending)})", file=sys.stderr)
            continue
        if not line:
            continue
        print("assistant> ", end="", flush=True)
        try:
            _answer(conv, line, pending, gen)
        except ValueError as e:  # a bad image or prompt: say so and keep the session
            print(f"\nerror: {e}", file=sys.stderr)
        pending = []


def register(subparsers) -> None:
    c = subparsers.add_parser("chat", help="chat with a checkpoint (one answer with --prompt, else interactive)")
    add_model_args(c, default_help="checkpoint folder (default: the shipped tiny model, see README)")
    c.add_argument("--image", action="append", default=[], help="image file for the first message (repeatable)")
    c.add_argument("--prompt", help="answer this one message and exit")
    c.add_argument("--system", help="system message (default: the template's)")
    c.add_argument("--max-tiles", type=int, help="tile budget per image (default: the checkpoint's)")
    add_generation_args(c)
    c.set_defaults(func=cmd_chat)
