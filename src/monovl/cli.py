"""The `monovl` command line: a table of subcommands, each a module imported only when it is run.

Every module in `COMMANDS` has `register(subparsers)`, which adds its parser, flags and handler (`func`).
`monovl --help` imports none of them; nothing imports this file.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import sys
import traceback

COMMANDS = {  # name → (module, one line for `monovl --help`)
    "chat": ("monovl.commands.chat", "chat with a checkpoint (one answer with --prompt, else interactive)"),
    "info": ("monovl.commands.info", "architecture, parameter counts and tokenizer facts of a checkpoint"),
    "bench": ("monovl.commands.speed", "prefill/decode speed vs this machine's GEMM peak and bandwidth"),
    "serve": ("monovl.commands.serve", "an OpenAI-compatible HTTP server with continuous batching"),
    "web": ("monovl.commands.web", "the browser chat page on a local server (default: the shipped model)"),
    "loadtest": ("monovl.commands.loadtest", "N concurrent streaming clients against a local server"),
    "eval": ("monovl.commands.eval", "evaluate a checkpoint on VLMEvalKit-format benchmark TSVs"),
    "monolithize": ("monovl.commands.monolithize", "make a plain LLM folder (InternLM2, Qwen, Llama) monolithic"),
    "train": ("monovl.commands.train", "train from a TOML recipe (single process or under torchrun)"),
    "plot": ("monovl.commands.plot", "draw the loss and learning-rate curves of a training run to a PNG"),
    "world": ("monovl.world", "generate the seeded synthetic world: stage data, corpus, benchmarks"),
    "demo": ("monovl.demo", "the tiny model on the bundled benchmarks; --reproduce trains it"),
}


class DefaultsFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" to a flag's help when it has a default worth showing and does not name it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with `command`'s module registered (every command's, for "*"); the others are named only."""
    p = Parser(prog="monovl", description="Monolithic multimodal LLMs (Mono-InternVL family)")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    p.add_argument("--version", action="version", version=f"monovl {importlib.metadata.version('monovl')}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        if command in (name, "*"):
            importlib.import_module(module).register(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (ValueError, OSError) as e:  # CheckpointError, ImageError, OutputError, bad arguments, files
        if args.verbose:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
