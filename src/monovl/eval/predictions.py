"""Scoring saved predictions without a model: monovl's JSONL, or VLMEvalKit's prediction files (.xlsx / .tsv
with `index` and `prediction` columns)."""
from __future__ import annotations

import csv
import json
import logging
import sys
import zipfile
from pathlib import Path

from monovl.eval.benchmarks import CIRCULAR_STEP, as_benchmark, circular_items
from monovl.eval.run import finish, score_rows, select_items

log = logging.getLogger(__name__)


def _cell(value) -> str:
    return "" if value is None else str(value)


def _rows(path: Path) -> list[dict]:
    if path.suffix == ".xlsx":
        return _xlsx_rows(path)
    if path.suffix == ".tsv":
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t"))
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a line of JSON ({e.msg})") from None
    return rows


def _xlsx_rows(path: Path) -> list[dict]:
    try:
        import openpyxl
    except ImportError:
        raise ImportError("reading .xlsx predictions needs openpyxl: pip install 'monovl[xlsx]'") from None
    book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    rows = book.worksheets[0].iter_rows(values_only=True)
    header = [_cell(h) for h in next(rows, [])]
    table = [dict(zip(header, row)) for row in rows]
    book.close()
    return table


def read_predictions(path) -> dict[int, str]:
    """{index: prediction} from a .jsonl ({"index", "prediction"} per line), .xlsx or .tsv file."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".xlsx", ".tsv"):
        raise ValueError(f"{path}: predictions must be .jsonl, .xlsx or .tsv")
    try:
        rows = _rows(path)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a UTF-8 text file (byte {e.start}: {e.reason})") from None
    except csv.Error as e:
        raise ValueError(f"{path}: not a readable TSV file ({e})") from None
    except (zipfile.BadZipFile, KeyError) as e:  # openpyxl on a file that is not a workbook
        raise ValueError(f"{path} is not a readable .xlsx workbook ({e})") from None
    out = {}
    for n, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or "index" not in row or "prediction" not in row:
            raise ValueError(f"{path}: row {n} has no 'index' or 'prediction'")
        try:
            out[int(float(row["index"]))] = _cell(row["prediction"])
        except (TypeError, ValueError):
            raise ValueError(f"{path}: row {n}: index {row['index']!r} is not an integer") from None
    return out


def rescore(bench_path, predictions_path, *, out_dir=None, kind: str | None = None, limit: int | None = None,
            circular: bool = False, seed: int = 0, judge=None) -> dict:
    """Score the predictions in `predictions_path` on the benchmark TSV, as `evaluate` scores a model's: same
    records and results. Predictions for rotated indices (index + k * 1e6) switch CircularEval on. A row
    without a prediction is a bad row (scored wrong); predictions for unknown indices are ignored."""
    bench = as_benchmark(bench_path, kind)
    predictions = read_predictions(predictions_path)
    rotated = bench.kind == "mc" and any(i >= CIRCULAR_STEP for i in predictions)
    items, circular = select_items(bench, limit=limit, circular=circular, seed=seed)
    if rotated and not any(i.index >= CIRCULAR_STEP for i in items):
        items, circular = circular_items(items), True
    unknown = set(predictions) - {i.index for i in items}
    if unknown:
        log.warning("%d predictions name no row of %s (e.g. index %d); ignored", len(unknown), bench.name,
                    min(unknown))
    outputs = [(predictions[i.index], None) if i.index in predictions else ("", "no prediction") for i in items]
    records = score_rows(items, bench.kind, outputs, judge, circular)
    settings = {"bench": str(bench.path or bench_path), "predictions": str(predictions_path), "limit": limit, "seed": seed,
                "judge": judge.describe() if judge is not None else None}
    return finish(bench, records, circular, settings, out_dir)
