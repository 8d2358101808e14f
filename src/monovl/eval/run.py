"""Run a model over a benchmark: batched generation, per-row scoring, results JSON and a Markdown table."""
from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Callable

import torch
from tqdm import tqdm

from monovl.eval import scoring
from monovl.checks import writable_dir, write_failed
from monovl.eval.benchmarks import (CIRCULAR_STEP, Benchmark, Item, as_benchmark, build_prompt, circular_items,
                                    sample_items)
from monovl.generation import generate
from monovl.images import ImageError
from monovl.inputs import ModelInputs, build_inputs
from monovl.template import extract_answer

log = logging.getLogger(__name__)

METRICS = {"mc": "accuracy", "yesno": "accuracy", "vqa": "vqa_accuracy", "anls": "anls",
           "relaxed": "relaxed_accuracy", "ocrbench": "accuracy", "exact": "exact_accuracy"}
DEFAULT_MAX_NEW_TOKENS = {"mc": 32, "yesno": 32, "vqa": 64, "anls": 64, "relaxed": 64, "ocrbench": 128,
                          "exact": 64}
DEFAULT_OUT = "eval_results"  # where results go without --out (ignored by git)


def score_item(item: Item, kind: str, prediction: str) -> tuple[float | None, str | None]:
    """(hit in [0, 1], the extracted answer) for one prediction; hit is None without a reference."""
    if not item.answers:
        return None, None
    if kind == "mc":
        return scoring.score_mc(prediction, item.options, item.answer)
    if kind == "yesno":
        return scoring.score_yes_no(prediction, item.answer)
    rule = {"vqa": scoring.vqa_accuracy, "anls": scoring.anls, "relaxed": scoring.relaxed_accuracy,
            "exact": scoring.exact_accuracy}.get(kind)
    if rule is not None:
        return rule(prediction, item.answers), None
    return scoring.ocrbench_hit(prediction, item.answers, item.category), None


def _prepare(model, tokenizer, item: Item, kind: str, max_tiles: int) -> ModelInputs:
    return build_inputs(model, tokenizer, build_prompt(item, kind), [ref.load() for ref in item.images],
                        max_tiles=max_tiles)


def _decode(tokenizer, row: torch.Tensor) -> str:
    ids, stops = [], set(tokenizer.stop_token_ids)
    for t in row.tolist():
        if t in stops:
            break
        ids.append(t)
    return extract_answer(tokenizer.decode(ids))


def _generate(model, tokenizer, prepared: list[ModelInputs], max_new_tokens: int) -> list[str]:
    ids = [p.input_ids for p in prepared]
    pixels = [p.pixel_values for p in prepared if p.pixel_values is not None]
    out = generate(model, ids, torch.cat(pixels) if pixels else None, max_new_tokens=max_new_tokens,
                   stop_token_ids=tokenizer.stop_token_ids)
    return [_decode(tokenizer, row) for row in out]


def predict(model, tokenizer, items: list[Item], kind: str, *, batch_size: int = 8, max_tiles: int = 6,
            max_new_tokens: int = 64, progress: bool = True,
            on_batch: Callable[[list[tuple[Item, str, str | None]]], None] | None = None
            ) -> list[tuple[str, str | None]]:
    """(prediction, error) per item, in order. A row whose image or generation fails gets ("", error).
    `on_batch` receives (item, prediction, error) of each batch as soon as it is answered."""
    results: list[tuple[str, str | None]] = [("", None)] * len(items)
    order = sorted(range(len(items)), key=lambda i: (len(items[i].images), len(items[i].question)))
    bar = tqdm(total=len(items), disable=not progress, desc="eval", unit="q")
    for start in range(0, len(order), batch_size):
        batch, prepared = [], []
        for i in order[start : start + batch_size]:
            try:
                prepared.append(_prepare(model, tokenizer, items[i], kind, max_tiles))
                batch.append(i)
            except (ImageError, ValueError, OSError) as e:
                log.warning("index %d: %s (scored wrong)", items[i].index, e)
                results[i] = ("", f"bad row: {e}")
        if batch:
            try:
                answers = _generate(model, tokenizer, prepared, max_new_tokens)
                results_batch = [(a, None) for a in answers]
            except (RuntimeError, ValueError) as e:  # retry one by one so that one bad row cannot sink the batch
                log.warning("batch failed (%s); retrying its rows one by one", e)
                results_batch = [_generate_one(model, tokenizer, p, items[i], max_new_tokens)
                                 for i, p in zip(batch, prepared)]
            for i, r in zip(batch, results_batch):
                results[i] = r
        if on_batch is not None:
            on_batch([(items[i], *results[i]) for i in order[start : start + batch_size]])
        bar.update(min(batch_size, len(order) - start))
    bar.close()
    return results


def _generate_one(model, tokenizer, prepared, item: Item, max_new_tokens: int) -> tuple[str, str | None]:
    try:
        return _generate(model, tokenizer, [prepared], max_new_tokens)[0], None
    except (RuntimeError, ValueError) as e:
        log.warning("index %d: generation failed: %s (scored wrong)", item.index, e)
        return "", f"generation failed: {e}"


def _aggregate(kind: str, records: list[dict], circular: bool) -> dict:
    scored = [r for r in records if r["hit"] is not None]
    if not scored:
        return {"score": None, "n": 0}
    hits = [r["hit"] for r in scored]
    if kind == "mc" and circular:
        acc, n = scoring.circular_accuracy({r["index"]: r["hit"] for r in scored})
        first = [r["hit"] for r in scored if r["index"] < CIRCULAR_STEP]
        return {"score": acc, "n": n, "vanilla": sum(first) / len(first) if first else None}
    out = {"score": sum(hits) / len(hits), "n": len(hits)}
    if kind == "yesno":
        mme = scoring.mme_scores([(r["category"] or "all", r["image_key"] or str(r["index"]), r["hit"])
                                  for r in scored])
        out["acc_plus"] = sum(c["acc_plus"] for c in mme["categories"].values()) / len(mme["categories"])
        out["mme_score"] = mme["score"]
        out.update({k: mme[k] for k in ("perception", "cognition", "total") if k in mme})
    if kind == "ocrbench":
        out["ocrbench_score"] = sum(hits)
    return out


def summarize(bench: Benchmark, records: list[dict], circular: bool, settings: dict | None = None) -> dict:
    """Overall and per-category numbers (scores are fractions in [0, 1]) plus counts."""
    by_cat: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_cat[r["category"] or "all"].append(r)
    return {
        "benchmark": bench.name, "kind": bench.kind, "metric": METRICS[bench.kind], "circular": circular,
        "overall": _aggregate(bench.kind, records, circular),
        "categories": {c: _aggregate(bench.kind, rs, circular) for c, rs in sorted(by_cat.items())},
        "counts": {"rows": len(records), "questions": len({r["index"] % CIRCULAR_STEP for r in records}),
                   "scored": sum(r["hit"] is not None for r in records),
                   "bad_rows": sum(r["error"] is not None for r in records),
                   "no_answer": sum(r["answer"] is None for r in records),
                   "judged": sum(bool(r.get("judged")) for r in records)},
        "settings": settings or {},
    }


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def format_markdown(results: dict) -> str:
    """A per-category Markdown table of `results` (scores in percent)."""
    keys = ("vanilla", "acc_plus", "mme_score", "perception", "cognition", "total", "ocrbench_score")
    extras = [k for k in keys if k in results["overall"]]
    head = ["category", "n", f"{results['metric']} (%)"] + extras
    lines = [f"# {results['benchmark']} ({results['kind']}{', circular' if results['circular'] else ''})", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    rows = [("**overall**", results["overall"])] + list(results["categories"].items())
    for name, r in rows:
        cells = [name, str(r["n"]), _pct(r["score"])]
        for k in extras:
            v = r.get(k)
            cells.append(_pct(v) if k in ("vanilla", "acc_plus") else ("-" if v is None else f"{v:.2f}"))
        lines.append("| " + " | ".join(cells) + " |")
    c = results["counts"]
    lines += ["", f"{c['questions']} questions, {c['rows']} rows, {c['scored']} scored, "
              f"{c['bad_rows']} bad rows, {c['no_answer']} without answer, {c['judged']} judged."]
    return "\n".join(lines) + "\n"


def select_items(bench: Benchmark, *, limit: int | None, circular: bool, seed: int = 0) -> tuple[list[Item], bool]:
    """The rows to answer: a stratified sample of `limit` questions, every rotation when `circular`; and
    whether CircularEval applies (also when the file already holds the copies)."""
    items = sample_items(bench.items, limit, seed) if limit is not None else bench.items
    if circular and bench.kind != "mc":
        raise ValueError(f"--circular applies to multiple-choice benchmarks; {bench.name} is {bench.kind!r}")
    if circular:
        items = circular_items(items)
    return items, circular or (bench.kind == "mc" and any(i.index >= CIRCULAR_STEP for i in items))


def score_rows(items: list[Item], kind: str, outputs: list[tuple[str, str | None]], judge=None,
               circular: bool = False) -> list[dict]:
    """One record per row: the prediction, its extracted answer and hit. With a `judge` (see `judge.py`), the
    multiple-choice and yes/no rows that exact matching cannot read are asked of it; in CircularEval not those
    whose question another rotation has already failed (as VLMEvalKit does)."""
    records = []
    for item, (prediction, error) in zip(items, outputs):
        hit, extracted = score_item(item, kind, prediction)
        if error is not None and hit is not None:
            hit = 0.0
        records.append({"index": item.index, "category": item.category, "question": item.question,
                        "options": item.options or None, "answer": item.answer, "prediction": prediction,
                        "extracted": extracted, "hit": hit, "error": error, "image_key": item.image_key})
    if judge is not None and kind in ("mc", "yesno"):
        failed = {r["index"] % CIRCULAR_STEP for r in records if r["hit"] == 0.0 and r["extracted"] is not None}
        for item, r in zip(items, records):
            if r["hit"] is None or r["extracted"] is not None or r["error"] is not None:
                continue
            if circular and item.group in failed:
                continue
            r["judged"], r["extracted"] = True, judge.extract(item, kind, r["prediction"])
            r["hit"] = float(r["extracted"] is not None and r["extracted"] == _expected(item, kind))
            if r["hit"] == 0.0:
                failed.add(item.group)
    return records


def _expected(item: Item, kind: str) -> str:
    return item.answer.strip() if kind == "mc" else item.answer.strip().lower()


def finish(bench: Benchmark, records: list[dict], circular: bool, settings: dict, out_dir=None) -> dict:
    """Summarize `records` and, with `out_dir`, write NAME.predictions.jsonl, .results.json and .results.md."""
    results = summarize(bench, records, circular, settings)
    if out_dir is not None:
        write_outputs(out_dir, bench.name, records, results)
    return results


def evaluate(model, tokenizer, bench_path, *, out_dir=None, kind: str | None = None, batch_size: int = 8,
             max_tiles: int = 6, max_new_tokens: int | None = None, limit: int | None = None,
             circular: bool = False, progress: bool = True, seed: int = 0, judge=None) -> dict:
    """Evaluate on one benchmark (a TSV path, or a Benchmark already read); returns the results dict, also
    written to `out_dir` when given as NAME.predictions.jsonl, NAME.results.json and NAME.results.md. The
    folder is checked before the first question, and NAME.predictions.jsonl receives each batch's predictions
    as they are made, so an interrupted run keeps them (`monovl eval --predictions` scores such a file)."""
    bench = as_benchmark(bench_path, kind)
    items, circular = select_items(bench, limit=limit, circular=circular, seed=seed)
    max_new_tokens = max_new_tokens or DEFAULT_MAX_NEW_TOKENS[bench.kind]
    with PredictionStream(out_dir, bench.name) as stream:
        outputs = predict(model, tokenizer, items, bench.kind, batch_size=batch_size, max_tiles=max_tiles,
                          max_new_tokens=max_new_tokens, progress=progress, on_batch=stream.write)
    records = score_rows(items, bench.kind, outputs, judge, circular)
    settings = {"bench": str(bench.path or bench_path), "batch_size": batch_size, "max_tiles": max_tiles,
                "max_new_tokens": max_new_tokens, "limit": limit, "seed": seed,
                "judge": judge.describe() if judge is not None else None}
    return finish(bench, records, circular, settings, out_dir)


class PredictionStream:
    """NAME.predictions.jsonl in `out_dir` (nothing without one), one {"index", "prediction", "error"} line per
    answered row, flushed per batch; `write_outputs` later replaces it with the scored records."""

    def __init__(self, out_dir, name: str):
        self.out = writable_dir(out_dir) if out_dir is not None else None
        self.file = None if self.out is None else self.out / f"{name}.predictions.jsonl"
        self.handle = None

    def __enter__(self) -> "PredictionStream":
        if self.file is not None:
            self.handle = self._io(lambda: self.file.open("w", encoding="utf-8"))
        return self

    def write(self, rows: list[tuple[Item, str, str | None]]) -> None:
        if self.handle is None:
            return
        text = "".join(json.dumps({"index": item.index, "prediction": p, "error": e}, ensure_ascii=False) + "\n"
                       for item, p, e in rows)
        self._io(lambda: (self.handle.write(text), self.handle.flush()))

    def _io(self, action):
        try:
            return action()
        except OSError as e:
            raise write_failed(e, self.out) from None

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.close()


def write_outputs(out_dir, name: str, records: list[dict], results: dict) -> None:
    """Each file is written beside its final name and then renamed, so a failed write keeps the old file."""
    out = writable_dir(out_dir)
    texts = {"predictions.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
             "results.json": json.dumps(results, indent=2, ensure_ascii=False) + "\n",
             "results.md": format_markdown(results)}
    for suffix, text in texts.items():
        final, tmp = out / f"{name}.{suffix}", out / f".{name}.{suffix}.tmp"
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, final)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise write_failed(e, out) from None

