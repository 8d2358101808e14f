"""Checks of what a user gives an entry point, made before any work starts: numbers in range (an argparse type)
and output folders that can be written. Standard library only, so that every command may use them."""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path


class OutputError(ValueError):
    """An output folder that cannot be written (read-only, a file, full, no permission); the message names it."""


def number(kind: type, low: float | None = None, high: float | None = None, *, low_open: bool = False):
    """An argparse type: a finite `kind` within [low, high] (`low_open`: above low), so that a bad value is
    one usage line with exit code 2 instead of a traceback later."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        bad = value != value or value in (float("inf"), float("-inf"))
        bad = bad or (low is not None and (value <= low if low_open else value < low))
        if bad or (high is not None and value > high):
            lo, hi = ("-inf" if low is None else low), ("inf" if high is None else high)
            raise argparse.ArgumentTypeError(f"{text!r} is outside {'(' if low_open else '['}{lo}, {hi}]")
        return value
    return parse


def reason(e: OSError) -> str:
    """The short cause of an OSError ("Permission denied", "No space left on device", ...)."""
    return e.strerror or str(e)


def writable_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """`path` as a folder that exists (created with its parents) and takes a new file; else an OutputError
    naming it. A full disk is found here only when not even a small file fits."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"the {what} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".monovl-write-test-", dir=path)
        try:
            os.write(fd, b"x" * 4096)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise OutputError(f"cannot write to the {what} {path}: {reason(e)}") from None
    return path


def write_failed(e: OSError, path, what: str = "output folder") -> OutputError:
    """The error to raise when writing under `path` failed midway (e.g. the disk filled up)."""
    where = f" ({e.filename})" if e.filename else ""
    return OutputError(f"writing to the {what} {path} failed: {reason(e)}{where}")
