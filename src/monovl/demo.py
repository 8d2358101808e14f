"""`monovl demo`: the shipped tiny model on held-out benchmarks of a world seed it never trained on: the
per-category table, streamed answers to a few pictures, a report with a chart. `--reproduce` trains it
(`monovl.reproduce`)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from monovl.checkpoint import SHIPPED_MODEL
from monovl.checks import number
from monovl.reproduce import (CHANCE, TOKENIZER_VOCAB, VISUAL_BENCHES, evaluate_model, evaluate_tsv, pct,
                              visual_chance)

log = logging.getLogger(__name__)


def category_table(scores: dict, cats: dict, counts: dict) -> str:
    """A Markdown table: one row per category, one column per benchmark: percent correct (number of questions)."""
    names = [b for b in VISUAL_BENCHES + ("text",) if b in scores]
    rows = sorted({c for b in names for c in cats[b]})

    def cell(b: str, c: str) -> str:
        score = scores[b] if c == "overall" else cats[b].get(c)
        return "-" if score is None else f"{pct(score)} ({counts[b][c]})"

    lines = ["| category | " + " | ".join(f"{b}: % (n)" for b in names) + " |", "|---|" + "---:|" * len(names),
             "| **overall** | " + " | ".join(cell(b, "overall") for b in names) + " |"]
    lines += [f"| {c} | " + " | ".join(cell(b, c) for b in names) + " |" for c in rows]
    return "\n".join(lines) + "\n"


def visual_summary(scores: dict, counts: dict) -> str:
    """The mean of the three visual benchmarks with its standard error (binomial, per benchmark)."""
    visual = sum(scores[b] for b in VISUAL_BENCHES) / len(VISUAL_BENCHES)
    se = sum(scores[b] * (1 - scores[b]) / counts[b]["overall"] for b in VISUAL_BENCHES) ** 0.5 / len(VISUAL_BENCHES)
    n = sum(counts[b]["overall"] for b in VISUAL_BENCHES)
    return (f"visual overall {pct(visual)} % ± {pct(se)} (standard error; {n} questions; chance "
            f"{pct(visual_chance())} %)")


def clean_summary(result: dict) -> str:
    """One line on the clean drawings (bench/clean/mc.tsv): plain Pillow shapes, not the world's renderer."""
    cats = ", ".join(f"{c} {pct(v['score'])} %" for c, v in sorted(result["categories"].items()))
    return (f"clean drawings (plain Pillow shapes on white, another renderer): {pct(result['overall']['score'])} % of "
            f"{result['overall']['n']} multiple-choice questions ({cats}; chance 25 %)")


def demo(model_dir=None, out_dir="demo_report", *, write=lambda s: None, limit: int | None = None,
         examples: int = 4) -> dict:
    """Evaluate the tiny model on held-out benchmarks of a world seed it never trained on (seed 1; it trained on
    seed 0), stream its answers to a few image questions through `write`, and write out_dir/report.md +
    categories.png. Returns {"scores", "categories", "counts", "report"}."""
    from monovl import load
    from monovl.conversation import Conversation
    from monovl.eval.benchmarks import load_benchmark
    from monovl.world import generate_world

    model_dir, out = Path(model_dir or SHIPPED_MODEL), Path(out_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no model at {model_dir} (no config.json). Train the tiny model with "
                                "`monovl demo --reproduce --out DIR`, then pass --model DIR/runs/delta/s2/final")
    model, tokenizer = load(model_dir, dtype=torch.float32)
    world, home = out / "world", out / "world-seed0"
    if not all((world / "bench" / f).is_file() for f in ("open.tsv", "clean/mc.tsv")):
        generate_world(world, seed=1, scale="eval")
    if not (home / "bench" / "text.tsv").is_file():  # the text questions: the training world's facts, held-out sums
        generate_world(home, seed=0, scale="eval")
    scores, cats, counts = evaluate_model(model, tokenizer, world / "bench", out / "eval", limit=limit,
                                          text_dir=home / "bench")
    table, summary = category_table(scores, cats, counts), visual_summary(scores, counts)
    clean = clean_summary(evaluate_tsv(model, tokenizer, world / "bench" / "clean" / "mc.tsv",
                                       out / "eval" / "clean", limit=limit))  # its own folder: its files are mc.*
    write(table + f"\n{summary}\n{clean}\n")
    lines = []
    for item in load_benchmark(world / "bench" / "open.tsv").items[:examples]:
        image = _save_image(out / "examples", item)
        write(f"\n[{image}] Q: {item.question}  (reference: {item.answer})\nA: ")
        answer = "".join(p for p in _stream(Conversation(model, tokenizer), item, write))
        write("\n")
        lines.append(f"- `{image.relative_to(out)}`: {item.question} → **{answer.strip()}** "
                     f"(reference: {item.answer})")
    out.mkdir(parents=True, exist_ok=True)
    _category_chart(out / "categories.png", cats, counts)
    report = out / "report.md"
    report.write_text(f"# monovl demo: {model_dir}\n\nHeld-out pictures of a world seed the model never trained on. "
                      "The text column asks about its training world's invented facts and sums it never saw. "
                      f"{summary[0].upper() + summary[1:]}.\n\n{table}\n{clean[0].upper() + clean[1:]}.\n\n"
                      "## Example answers\n\n" + "\n".join(lines)
                      + "\n\n![per-category accuracy](categories.png)\n")
    return {"scores": scores, "categories": cats, "counts": counts, "report": report, "clean": clean}


def _save_image(folder: Path, item) -> Path:
    """Write the picture of a benchmark row to folder/open_INDEX.png, so the streamed answer names a file to open."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"open_{item.index}.png"
    data = item.images[0].load()
    path.write_bytes(data if isinstance(data, bytes) else Path(data).read_bytes())
    return path


def _stream(conv, item, write):
    from monovl.eval.benchmarks import build_prompt

    # asked as the benchmark asks it (with the short-answer instruction the model was trained with)
    for piece in conv.stream(build_prompt(item, "vqa"), [item.images[0].load()], max_new_tokens=16):
        write(piece)
        yield piece


def _category_chart(path: Path, cats: dict, counts: dict) -> None:
    """Per-category accuracy of each visual benchmark, with each benchmark's chance level as a dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4))
    names = [b for b in VISUAL_BENCHES if b in cats]
    categories = sorted({c for b in names for c in cats[b]})
    width = 0.8 / max(1, len(names))
    for k, b in enumerate(names):
        bars = ax.bar([i + k * width for i in range(len(categories))],
                      [100 * (cats[b].get(c) or 0) for c in categories], width, label=f"{b} (n={counts[b]['overall']})")
        if CHANCE[b]:
            ax.axhline(100 * CHANCE[b], color=bars.patches[0].get_facecolor(), linestyle=":", linewidth=1.5,
                       label=f"{b} chance")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(categories))], categories)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("The tiny Mono-InternVL on held-out pictures, by question category")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _cmd_demo(args) -> int:
    if args.reproduce:
        from monovl.reproduce import reproduce

        out = reproduce(args.out, scale=args.scale, steps_scale=args.steps_scale,
                        eval_limit=args.eval_limit or None, from_scratch=args.from_scratch)
        print((Path(args.out) / "report.md").read_text())
        print(f"report {Path(args.out) / 'report.md'}; final model {out['final']}; {out['seconds'] / 60:.1f} min")
        return 0
    result = demo(args.model, args.out, write=lambda s: print(s, end="", flush=True),  # main() reports errors
                  limit=args.limit or None)
    print(f"\nreport {result['report']}")
    return 0


def register(subparsers) -> None:
    """Add `monovl demo [--reproduce] [--out DIR] [--scale small|default] [--steps-scale F] [--model DIR]`."""
    p = subparsers.add_parser("demo", help="the tiny model on the bundled benchmarks; --reproduce trains it")
    p.add_argument("--reproduce", action="store_true",
                   help="train S1.1 → S2 (delta and full tuning) from the shipped pre-trained tiny LLM first")
    p.add_argument("--from-scratch", action="store_true",
                   help="--reproduce: also pre-train the stage-0 LLM (tokenizer, reading curriculum; about an hour)")
    p.add_argument("--out", default="demo_report", help="output folder (report, charts, runs)")
    p.add_argument("--scale", choices=sorted(TOKENIZER_VOCAB), default="default", help="--reproduce: world size")
    p.add_argument("--steps-scale", type=number(float, 0, low_open=True), default=1.0,
                   help="--reproduce: multiply every recipe's steps")
    p.add_argument("--eval-limit", type=number(int, 0), default=100,
                   help="--reproduce: questions per benchmark after each stage (0: all)")
    p.add_argument("--model", help="model folder (default: the shipped tiny model)")
    p.add_argument("--limit", type=number(int, 0), default=0, help="questions per benchmark (default 0: all 300)")
    p.set_defaults(func=_cmd_demo)
