"""`monovl chat`: one answer with --prompt, else an interactive session."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from monovl.commands import add_generation_args, add_model_args, generation_kwargs, number


HELP = ("commands: '/image PATH' attaches an image to your next message, '/reset' starts a new conversation, "
        "'/help' shows this, '/exit' (or Ctrl-D) quits; Ctrl-C stops an answer.")


def _answer(conv, question: str, images: list[str], gen: dict) -> None:
    for piece in conv.stream(question, images, **gen):
        print(piece, end="", flush=True)
    print()


def _bad_images(paths) -> str | None:
    """Why the image files cannot be used (missing, not an image, corrupt, too large), or None: checked before
    the model loads and before an interactive /image is attached."""
    bad = [p for p in paths if not Path(p).is_file()]
    if bad:
        return f"no such image file: {', '.join(bad)}"
    from monovl.images import ImageError, load_image

    for path in paths:
        try:
            load_image(path).close()
        except ImageError as e:
            return str(e)
    return None


def _discard_typeahead() -> None:
    """Drop what was typed while an answer streamed, so it is not mixed into the next message."""
    if not sys.stdin.isatty():
        return
    try:
        import termios
    except ImportError:  # not on this platform
        return
    termios.tcflush(sys.stdin, termios.TCIFLUSH)


def cmd_chat(args) -> int:
    if problem := _bad_images(args.image):  # before the model loads
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from monovl import load
    from monovl.checkpoint import model_dir, parse_dtype, read_config
    from monovl.conversation import Conversation

    if args.image and read_config(model_dir(args.model)).vision is None:
        print(f"error: {model_dir(args.model)} is a text-only LLM: it cannot take --image", file=sys.stderr)
        return 2

    model, tokenizer = load(args.model, dtype=parse_dtype(args.dtype), device=args.device, quantize=args.quantize)

    def new_conversation():
        return Conversation(model, tokenizer, system=args.system, max_tiles=args.max_tiles,
                            raw_special_tokens=args.raw_special_tokens)

    gen = generation_kwargs(args)
    if args.prompt is not None:
        _answer(new_conversation(), args.prompt, args.image, gen)
        return 0
    print(f"monovl chat: type a message. {HELP}", file=sys.stderr)
    return _repl(new_conversation, list(args.image), gen)


def _command(line: str, state: dict, new_conversation) -> bool:
    """Run a /command; False when it asks to quit."""
    name, _, rest = line.partition(" ")
    if name in ("/exit", "/quit"):
        return False
    if name == "/reset":
        state["conv"], state["pending"] = new_conversation(), []
        print("(new conversation)", file=sys.stderr)
    elif name == "/help":
        print(HELP, file=sys.stderr)
    elif name == "/image":
        paths = shlex.split(rest)
        problem = _bad_images(paths) or (None if paths else "usage: /image PATH")
        if problem:
            print(f"error: {problem}", file=sys.stderr)
        else:
            state["pending"] += paths
            print(f"(attached: {', '.join(state['pending'])})", file=sys.stderr)
    else:
        print(f"error: unknown command {name} (/help lists them)", file=sys.stderr)
    return True


def _repl(new_conversation, pending: list[str], gen: dict) -> int:
    state = {"conv": new_conversation(), "pending": pending}
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: quit
            print()
            return 0
        if line.startswith("/"):
            if not _command(line, state, new_conversation):
                return 0
            continue
        if not line:
            continue
        print("assistant> ", end="", flush=True)
        try:
            _answer(state["conv"], line, state["pending"], gen)
        except KeyboardInterrupt:  # stop this answer (it is not kept), keep the conversation
            print("\n(answer stopped)", file=sys.stderr)
        except ValueError as e:  # a bad image or prompt: say so and keep the session
            print(f"\nerror: {e}", file=sys.stderr)
        state["pending"] = []
        _discard_typeahead()


def register(subparsers) -> None:
    c = subparsers.add_parser("chat", help="chat with a checkpoint (one answer with --prompt, else interactive)")
    add_model_args(c, default_help="checkpoint folder (default: the shipped tiny model, see README)")
    c.add_argument("--image", action="append", default=[], help="image file for the first message (repeatable)")
    c.add_argument("--prompt", help="answer this one message and exit")
    c.add_argument("--system", help="system message (default: the template's)")
    c.add_argument("--max-tiles", type=number(int, 1), help="tile budget per image (default: the checkpoint's)")
    c.add_argument("--raw-special-tokens", action="store_true",
                   help="tokenize special tokens you type (<|im_end|>, ...) as control tokens; default: they stay text")
    add_generation_args(c)
    c.set_defaults(func=cmd_chat)
