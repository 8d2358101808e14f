"""Benchmark files in VLMEvalKit's TSV format and the InternVL-family prompts.

One TSV per benchmark. Columns: `index` (unique int), `question`, optional `image` (base64; a cell of at most
64 characters is the `index` of the row holding the image; a Python-list string of base64 strings for
several images) or `image_path` (a path or a Python-list string of paths, relative to the TSV's folder),
option columns `A`, `B`, ..., `answer` (absent in test splits; a Python-list string for several references),
`hint`, `category`, `l2-category`, `split`. Images stay encoded until a batch needs them.
"""
from __future__ import annotations

import ast
import base64
import binascii
import csv
import random
import re
import string
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from monovl.template import MC_SUFFIX, MC_SUFFIX_CN, VQA_SUFFIX, YESNO_SUFFIX

BENCHMARK_KINDS = ("mc", "yesno", "vqa", "anls", "relaxed", "ocrbench", "exact")
# The scoring rule VLMEvalKit uses for a benchmark, by a case-insensitive part of its name; first match wins.
KIND_BY_NAME = (
    ("mme-realworld", "mc"), ("mmbench", "mc"), ("ccbench", "mc"), ("seedbench", "mc"), ("scienceqa", "mc"),
    ("ai2d", "mc"), ("mmstar", "mc"), ("mmmu", "mc"), ("realworldqa", "mc"), ("a-okvqa", "mc"), ("blink", "mc"),
    ("circular", "mc"), ("hallusionbench", "yesno"), ("pope", "yesno"), ("mme", "yesno"), ("textvqa", "vqa"),
    ("docvqa", "anls"), ("infovqa", "anls"), ("chartqa", "relaxed"), ("ocrbench", "ocrbench"),
    ("ocrvqa", "exact"), ("gqa", "exact"),
)
CIRCULAR_STEP = 1_000_000  # CircularEval copy k of a question has index + k * CIRCULAR_STEP
_CJK = re.compile(r"[\u4e00-\u9fff]")


@dataclass(frozen=True)
class ImageRef:
    """One image of an item: base64 text, a file path, or why the row's image cell cannot be used."""

    b64: str | None = None
    path: Path | None = None
    error: str | None = None

    def load(self) -> bytes | Path:
        """Raw bytes (base64 decoded) or the path; raises ValueError on invalid base64 or a bad cell."""
        if self.error is not None:
            raise ValueError(self.error)
        if self.path is not None:
            return self.path
        try:
            return base64.b64decode(self.b64, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"invalid base64 image data ({e})") from e


@dataclass
class Item:
    """One benchmark question. `answers` holds every reference (empty in test splits)."""

    index: int
    question: str
    options: dict[str, str] = field(default_factory=dict)  # letter -> option text, in letter order
    answers: list[str] = field(default_factory=list)
    hint: str | None = None
    category: str | None = None
    images: list[ImageRef] = field(default_factory=list)
    image_key: str | None = None  # identity of the image(s), shared by rows that reference one image
    extra: dict[str, str] = field(default_factory=dict)  # l2-category, split, ...

    @property
    def group(self) -> int:
        """The original question of a CircularEval copy."""
        return self.index % CIRCULAR_STEP

    @property
    def answer(self) -> str | None:
        return self.answers[0] if self.answers else None


@dataclass
class Benchmark:
    name: str
    kind: str
    items: list[Item]
    path: Path | None = None  # the TSV it was read from

    @property
    def has_answers(self) -> bool:
        return any(item.answers for item in self.items)


def _missing(cell: str | None) -> bool:
    return cell is None or cell.strip() == "" or cell.strip().lower() == "nan"


def _literal_list(cell: str) -> list[str] | None:
    """A Python-list string as a list of strings (ast.literal_eval, never eval), else None."""
    text = cell.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else None


def read_rows(path) -> tuple[list[str], list[dict[str, str]]]:
    """(column names, rows) of a TSV; quoted cells (as pandas writes them) are unquoted."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file {path} does not exist")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images make very long cells
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t")
            rows = []
            for row in reader:
                if None in row or None in row.values():  # more cells than the header, or fewer
                    cells = len(row.pop(None, [])) + sum(v is not None for v in row.values())
                    raise ValueError(f"{path}:{reader.line_num}: {cells} cells where the header has "
                                     f"{len(reader.fieldnames)} columns ({', '.join(reader.fieldnames)})")
                rows.append(row)
            columns = list(reader.fieldnames or [])
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a UTF-8 text file (a benchmark TSV is; byte {e.start}: {e.reason})") from None
    except csv.Error as e:
        raise ValueError(f"{path}: not a readable TSV file ({e})") from None
    if not columns:
        raise ValueError(f"{path}: empty benchmark file (no header row)")
    for needed in ("index", "question"):
        if needed not in columns:
            raise ValueError(f"{path}: no '{needed}' column (columns: {', '.join(columns)})")
    return columns, rows


def _option_columns(columns: list[str]) -> list[str]:
    letters = [c for c in string.ascii_uppercase if c in columns]
    return letters


def _is_index(cell: str) -> bool:
    """A short image cell that is a row index refers to that row's image; any other cell is image data."""
    try:
        return float(cell.strip()).is_integer()
    except ValueError:
        return False


def _images(row: dict[str, str], by_index: dict[str, dict], base: Path) -> tuple[list[ImageRef], str | None]:
    cell = row.get("image")
    if not _missing(cell):
        key = row["index"].strip()
        if len(cell.strip()) <= 64 and _is_index(cell):  # a reference to the row that holds the image
            key = cell.strip()
            if key not in by_index or _missing(by_index[key].get("image")):
                return [ImageRef(error=f"image refers to index {key!r}, which has no image")], f"index:{key}"
            cell = by_index[key]["image"]
        listed = _literal_list(cell)
        return [ImageRef(b64=s) for s in (listed if listed is not None else [cell.strip()])], f"index:{key}"
    cell = row.get("image_path")
    if not _missing(cell):
        listed = _literal_list(cell)
        paths = [base / p for p in (listed if listed is not None else [cell.strip()])]
        return [ImageRef(path=p) for p in paths], "path:" + "|".join(map(str, paths))
    return [], None


def infer_kind(items: list[Item]) -> str:
    """Options present -> 'mc'; every answer yes/no -> 'yesno'; else 'vqa'."""
    if any(item.options for item in items):
        return "mc"
    answers = [a for item in items for a in item.answers]
    if answers and all(a.strip().lower() in ("yes", "no") for a in answers):
        return "yesno"
    return "vqa"


def kind_from_name(name: str) -> str | None:
    """The kind of a known benchmark (MMBench_DEV_EN -> 'mc', DocVQA_VAL -> 'anls', ...), else None."""
    low = name.lower()
    return next((kind for part, kind in KIND_BY_NAME if part in low), None)


def load_benchmark(path, kind: str | None = None) -> Benchmark:
    """Read a benchmark TSV. Its kind: `kind` (one of BENCHMARK_KINDS) if given, else the one VLMEvalKit uses
    for the file name (`kind_from_name`), else the one the columns suggest (`infer_kind`)."""
    path = Path(path)
    if kind is not None and kind not in BENCHMARK_KINDS:
        raise ValueError(f"unknown benchmark kind {kind!r}; choose one of {', '.join(BENCHMARK_KINDS)}")
    columns, rows = read_rows(path)
    letters = _option_columns(columns)
    by_index = {row["index"].strip(): row for row in rows}
    items, seen = [], set()
    for n, row in enumerate(rows, start=2):  # line numbers: the header is line 1
        try:
            index = int(float(row["index"]))
        except (TypeError, ValueError):
            raise ValueError(f"{path}:{n}: index {row['index']!r} is not an integer") from None
        if index in seen:
            raise ValueError(f"{path}:{n}: duplicate index {index}")
        seen.add(index)
        images, key = _images(row, by_index, path.parent)
        answer = row.get("answer")
        answers = [] if _missing(answer) else (_literal_list(answer) or [answer.strip()])
        extra = {c: row[c] for c in ("l2-category", "split") if not _missing(row.get(c))}
        items.append(Item(
            index=index, question=row["question"] or "", answers=answers, images=images, image_key=key,
            options={c: row[c].strip() for c in letters if not _missing(row.get(c))},
            hint=None if _missing(row.get("hint")) else row["hint"],
            category=None if _missing(row.get("category")) else row["category"].strip(), extra=extra))
    if not items:
        raise ValueError(f"{path}: no rows")
    return Benchmark(name=path.stem, kind=kind or kind_from_name(path.stem) or infer_kind(items), items=items,
                     path=path)


def as_benchmark(bench, kind: str | None = None) -> Benchmark:
    """`bench` if already read (a Benchmark), else the TSV at that path read with `load_benchmark`."""
    return bench if isinstance(bench, Benchmark) else load_benchmark(bench, kind)


def sample_items(items: list[Item], limit: int, seed: int = 0) -> list[Item]:
    """A seeded sample of `limit` questions, stratified by category (each category keeps its share, rounded by
    largest remainder), in file order. CircularEval copies stay with their question."""
    groups: dict[int, list[Item]] = {}
    for item in items:
        groups.setdefault(item.group, []).append(item)
    if limit >= len(groups):
        return list(items)
    by_cat: dict[str, list[int]] = {}
    for g, members in groups.items():
        by_cat.setdefault(members[0].category or "", []).append(g)
    exact = {c: limit * len(gs) / len(groups) for c, gs in by_cat.items()}
    quota = {c: int(x) for c, x in exact.items()}
    for c in sorted(exact, key=lambda c: (quota[c] - exact[c], c))[: limit - sum(quota.values())]:
        quota[c] += 1
    rng = random.Random(seed)
    chosen = {g for c, gs in sorted(by_cat.items()) for g in rng.sample(gs, quota[c])}
    return [item for item in items if item.group in chosen]


def rotate(item: Item, k: int) -> Item:
    """CircularEval copy k: option letter i gets the text of old option (i + k) mod n; index + k * 1e6."""
    letters = list(item.options)
    n = len(letters)
    texts = [item.options[c] for c in letters]
    options = {c: texts[(i + k) % n] for i, c in enumerate(letters)}
    answers = item.answers
    if item.answer in item.options:
        answers = [letters[(letters.index(item.answer) - k) % n]]
    return replace(item, index=item.index + k * CIRCULAR_STEP, options=options, answers=answers)


def circular_items(items: list[Item]) -> list[Item]:
    """Every rotation of every multiple-choice item; files that already hold copies are left as they are."""
    if any(item.index >= CIRCULAR_STEP for item in items):
        return list(items)
    return [rotate(item, k) for item in items for k in range(max(1, len(item.options)))]


def build_prompt(item: Item, kind: str) -> str:
    """The question text the InternVL family is evaluated with (images are added by the template)."""
    if kind == "mc":
        text = (f"{item.hint}\n" if item.hint else "") + item.question
        text += "".join(f"\n{c}. {t}" for c, t in item.options.items())
        if not item.options:
            return text
        return text + "\n" + (MC_SUFFIX_CN if _CJK.search(text) else MC_SUFFIX)
    if kind == "yesno":
        return f"{item.question}\n{YESNO_SUFFIX}"
    return f"{item.question}\n{VQA_SUFFIX}"
