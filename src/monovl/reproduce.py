"""`monovl demo --reproduce`: train the tiny model (S1.1 → S1.2 → S1.3 → S2 from the shipped pre-trained LLM; with
`from_scratch` the world's tokenizer and stage 0 first) next to a full-tuning ablation on the same data and steps,
evaluate after every stage, and write the paper-style report (Markdown + PNG charts).

Every stage runs through `monovl.train.loop.train` with the recipes in `monovl/recipes/tiny/evip/`; only their paths
(under the output folder), the step counts (`steps_scale`) and, for the ablation, the freeze stage change.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from monovl.checkpoint import SHIPPED_MODEL
from monovl.eval.run import evaluate

log = logging.getLogger(__name__)

SHIPPED_LLM = SHIPPED_MODEL.parent / "tiny-llm"  # stage 0: the pre-trained plain LLM the shipped model starts from
RECIPES = Path(__file__).resolve().parent / "recipes" / "tiny" / "evip"  # package data: works from a wheel
STAGES = ("s0_llm", "s1_1", "s1_2", "s1_3", "s2")  # recipe stems, in training order
WARMUP = ("s0_recall", "s0_reading", "s0_choice")  # stage 0's first parts (only with --from-scratch): a reader
VISUAL_BENCHES = ("mc", "yesno", "open")
CHANCE = {"mc": 0.25, "yesno": 0.5, "open": 0.0}  # 4 options; yes/no; free answers (no guessing floor)
TOKENIZER_VOCAB = {"small": 512, "default": 1024}


@dataclass
class StageResult:
    chain: str  # "delta" (EViP freezing) or "full" (everything trains at every stage)
    stage: str
    scores: dict = field(default_factory=dict)  # bench name → overall score in [0, 1]
    categories: dict = field(default_factory=dict)  # bench name → {category: score}
    text_logits_identical: bool | None = None  # text-only logits equal to stage 0's, bit for bit
    text_logits_max_diff: float | None = None
    train_seconds: float = 0.0
    reading: dict = field(default_factory=dict)  # stage 0 only: {bench: score} on the described benchmarks
    counts: dict = field(default_factory=dict)  # bench name → {"overall" or category: number of questions}

    @property
    def visual(self) -> float | None:
        got = [self.scores[b] for b in VISUAL_BENCHES if self.scores.get(b) is not None]
        return sum(got) / len(got) if got else None


def visual_chance() -> float:
    return sum(CHANCE.values()) / len(CHANCE)


def evaluate_tsv(model, tokenizer, path: Path, out_dir: Path | None = None, *, limit: int | None = None,
                 progress: bool = False) -> dict:
    """`monovl.eval.run.evaluate` on one benchmark TSV with the settings every tiny-model report uses (16 questions
    at a time, as many tiles as the model's config allows (`max_dynamic_patch`), 16 answer tokens)."""
    return evaluate(model, tokenizer, path, out_dir=out_dir, limit=limit, progress=progress, batch_size=16,
                    max_tiles=model.cfg.max_dynamic_patch, max_new_tokens=16)


def evaluate_model(model, tokenizer, bench_dir: Path, out_dir: Path | None = None, *, limit: int | None = None,
                   text_only: bool = False, progress: bool = False,
                   text_dir: Path | None = None) -> tuple[dict, dict, dict]:
    """({bench: overall score}, {bench: {category: score}}, {bench: {"overall" or category: questions}}) on
    bench_dir/{mc,yesno,open,text}.tsv (text.tsv from `text_dir` when given: a world's facts are drawn per seed, so
    a model is asked about its training world's); a text-only model (or `text_only`) gets the text benchmark only."""
    benches = ("text",) if text_only or model.cfg.vision is None else VISUAL_BENCHES + ("text",)
    text_dir = Path(text_dir or bench_dir)
    scores, cats, counts = {}, {}, {}
    for name in benches:
        folder = text_dir if name == "text" else bench_dir
        r = evaluate_tsv(model, tokenizer, folder / f"{name}.tsv", out_dir, limit=limit, progress=progress)
        scores[name] = r["overall"]["score"]
        cats[name] = {c: v["score"] for c, v in r["categories"].items()}
        counts[name] = {"overall": r["overall"]["n"]} | {c: v["n"] for c, v in r["categories"].items()}
    scores["text_lm"] = text_completion_accuracy(model, tokenizer, text_dir / "text.tsv", limit=limit)
    return scores, cats, counts


def reading_scores(model, tokenizer, bench_dir: Path, *, limit: int | None = None) -> dict:
    """{bench: score} of a text LLM on bench_dir/described/{mc,yesno,open}.tsv: the visual questions with each image
    given as its caption — how well the LLM answers them from context when perception is perfect."""
    described = bench_dir / "described"
    return {name: evaluate_tsv(model, tokenizer, described / f"{name}.tsv", limit=limit)["overall"]["score"]
            for name in VISUAL_BENCHES}


def text_completion_accuracy(model, tokenizer, bench_path: Path, *, limit: int | None = None,
                             batch_size: int = 32) -> float:
    """Accuracy on the text benchmark asked in the base LLM's own format ("Question: … Answer:", no chat
    template): the language ability that stage 0 has and delta tuning must keep. Greedy; the answer ends at '.'."""
    from monovl.eval.benchmarks import load_benchmark
    from monovl.eval.scoring import normalize_vqa
    from monovl.generation import generate

    items = load_benchmark(bench_path).items[:limit]
    hits, stops = 0, set(tokenizer.stop_token_ids)
    model.eval()
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        ids = [torch.tensor(tokenizer.encode(f"Question: {it.question} Answer:")) for it in batch]
        with torch.no_grad():
            out = generate(model, ids, max_new_tokens=12, stop_token_ids=tokenizer.stop_token_ids)
        for it, row in zip(batch, out):
            text = tokenizer.decode([t for t in row.tolist() if t not in stops]).split(".")[0]
            hits += normalize_vqa(text) == normalize_vqa(it.answer)
    return hits / len(items) if items else 0.0


def text_logits(model, tokenizer, prompts: list[str]) -> list[torch.Tensor]:
    """Last-layer logits of each text-only chat prompt (the delta-tuning invariant)."""
    from monovl.template import build_query

    model.eval()
    with torch.no_grad():
        return [model(torch.tensor(tokenizer.encode(build_query(p, [])))[None])[0] for p in prompts]


def stage_config(stem: str, root: Path, chain: str, steps_scale: float = 1.0, progress: bool = True):
    """The recipe `stem` with its data under root/world and its runs under root/runs/CHAIN (stage 0 is shared,
    under root/runs/s0); `chain == "full"` trains everything at every stage."""
    from monovl.train.recipe import load_recipe

    cfg = load_recipe(RECIPES / f"{stem}.toml")
    for src in cfg.data.sources:
        src["path"] = str(root / "world" / Path(src["path"]).relative_to("data/world"))
    runs = root / "runs"
    if stem in WARMUP:
        before = WARMUP.index(stem) - 1
        cfg.model.path = str(runs / (WARMUP[before] + "/final" if before >= 0 else "init"))
        cfg.run.out_dir = str(runs / stem)
    elif (index := STAGES.index(stem)) == 0:
        cfg.model.path, cfg.run.out_dir = str(runs / WARMUP[-1] / "final"), str(runs / "s0")
    else:
        prev = runs / "s0" if index == 1 else runs / chain / STAGES[index - 1]
        cfg.model.path, cfg.run.out_dir = str(prev / "final"), str(runs / chain / stem)
        if chain == "full":
            cfg.model.stage = "full"
    cfg.schedule.steps = max(1, round(cfg.schedule.steps * steps_scale))
    cfg.schedule.warmup_steps = min(cfg.schedule.warmup_steps, max(1, cfg.schedule.steps // 10))
    cfg.checkpoint.every, cfg.run.tensorboard, cfg.run.progress = 0, False, progress
    return cfg


def prepare(root: Path, scale: str, seed: int = 0, *, from_scratch: bool = False) -> Path:
    """The world, and the LLM that S1.1 starts from: the shipped pre-trained tiny LLM copied to root/runs/s0/final
    (as Mono-InternVL starts from InternLM2), or with `from_scratch` a tokenizer trained on the world's texts and a
    random `tiny-llm` checkpoint in root/runs/init for stage 0 to train."""
    from monovl.checkpoint import save_model
    from monovl.config import preset
    from monovl.scratch import new_model
    from monovl.tokenizer import build_bpe_tokenizer
    from monovl.world import generate_world, world_texts

    world = root / "world"
    generate_world(world, seed=seed, scale=scale)
    if not from_scratch:
        shutil.copytree(SHIPPED_LLM, root / "runs" / "s0" / "final", dirs_exist_ok=True)
        return world
    init = root / "runs" / "init"
    tokenizer = build_bpe_tokenizer(world_texts(world), vocab_size=TOKENIZER_VOCAB[scale], out_dir=init)
    cfg = preset("tiny-llm", vocab_size=tokenizer.vocab_size)
    save_model(new_model(cfg, seed=seed), init, tokenizer=tokenizer)
    return world


def reproduce(out_dir, scale: str = "default", steps_scale: float = 1.0, *, eval_limit: int | None = 100,
              progress: bool = True, from_scratch: bool = False) -> dict:
    """Train S1.1 → S2 from the shipped stage-0 LLM (`from_scratch`: stage 0 too) with delta tuning and with full
    tuning; evaluate after every stage (the first `eval_limit` questions of each benchmark; None: all); write
    the report.
    Returns {"results": [StageResult...], "final": path of the delta chain's S2 model, "seconds": ...}."""
    from monovl import load
    from monovl.eval.benchmarks import load_benchmark
    from monovl.train.loop import train

    root, t0 = Path(out_dir), time.perf_counter()
    world = prepare(root, scale, from_scratch=from_scratch)
    bench = world / "bench"
    prompts = [item.question for item in load_benchmark(bench / "text.tsv").items[:4]]
    results, reference, final = [], None, None
    for chain in ("delta", "full"):
        for stem in STAGES if chain == "delta" else STAGES[1:]:
            cfg = stage_config(stem, root, chain, steps_scale, progress)
            t = time.perf_counter()
            log.info("%s chain: training %s (%d steps)", chain, stem, cfg.schedule.steps)
            if stem == STAGES[0] and not from_scratch:
                path = root / "runs" / "s0" / "final"  # the shipped pre-trained LLM (prepare copied it)
            else:
                for warmup in WARMUP if stem == STAGES[0] else ():
                    train(stage_config(warmup, root, chain, steps_scale, progress))
                path = train(cfg)["final"]
            res = StageResult(chain, stem, train_seconds=time.perf_counter() - t)
            model, tokenizer = load(path, dtype=torch.float32)
            res.scores, res.categories, res.counts = evaluate_model(model, tokenizer, bench, Path(cfg.run.out_dir) / "eval",
                                                        limit=eval_limit, progress=progress)
            logits = text_logits(model, tokenizer, prompts)
            if reference is None:
                reference = logits
                res.reading = reading_scores(model, tokenizer, bench, limit=eval_limit)
            res.text_logits_identical = all(torch.equal(a, b) for a, b in zip(logits, reference))
            res.text_logits_max_diff = max(float((a - b).abs().max()) for a, b in zip(logits, reference))
            results.append(res)
            if chain == "delta":
                final = path
        if chain == "delta":  # the full chain shares stage 0
            results.append(StageResult("full", "s0_llm", dict(results[0].scores), dict(results[0].categories),
                                       True, 0.0, 0.0, reading=dict(results[0].reading),
                                       counts=dict(results[0].counts)))
    seconds = time.perf_counter() - t0
    write_report(root, results, seconds=seconds, scale=scale, steps_scale=steps_scale)
    return {"results": results, "final": final, "seconds": seconds}


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _ordered(results: list[StageResult], chain: str) -> list[StageResult]:
    return sorted((r for r in results if r.chain == chain), key=lambda r: STAGES.index(r.stage))


def report_markdown(results: list[StageResult], *, seconds: float, scale: str, steps_scale: float) -> str:
    lines = ["# monovl demo --reproduce: the tiny Mono-InternVL, EViP from its pre-trained LLM", "",
             f"World scale `{scale}`, steps × {steps_scale:g}, {seconds / 60:.1f} min in all. Visual = mean of the "
             f"held-out mc / yesno / open benchmarks; chance level {pct(visual_chance())} % "
             "(mc 25 %, yes/no 50 %, open 0 %). Text, LLM format = the text benchmark asked as the stage-0 corpus "
             "asks it (`Question: … Answer:`, no chat template): the language ability delta tuning must keep; "
             "text, chat = the same questions in the chat template (stage 0 learns it from the world's text-only "
             "chat).", ""]
    for chain, title in (("delta", "Delta tuning (EViP freezing)"), ("full", "Full-tuning ablation")):
        lines += [f"## {title}", "", "| stage | visual (%) | mc | yesno | open | text, LLM format (%) "
                  "| text, chat (%) | text logits = stage 0 | max abs diff | train s |",
                  "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
        for r in _ordered(results, chain):
            same = "-" if r.text_logits_identical is None else ("yes" if r.text_logits_identical else "no")
            diff = "-" if r.text_logits_max_diff is None else f"{r.text_logits_max_diff:.3g}"
            cells = [r.stage, pct(r.visual), *(pct(r.scores.get(b)) for b in VISUAL_BENCHES),
                     pct(r.scores.get("text_lm")), pct(r.scores.get("text")), same, diff, f"{r.train_seconds:.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    delta = _ordered(results, "delta")
    final, reading = delta[-1], delta[0].reading
    if final.visual is not None:
        lines += [f"Final delta-tuned model: visual {pct(final.visual)} % (chance {pct(visual_chance())} %).", ""]
    if reading:
        lines += [f"Reading reference: the stage-0 LLM, given each held-out image as its caption in text "
                  f"(`bench/described/`, the same questions), scores {pct(sum(reading.values()) / len(reading))} % "
                  f"(" + ", ".join(f"{b} {pct(v)}" for b, v in reading.items()) + "). That is how well the frozen "
                  "LLM answers these questions from context when perception is perfect; delta tuning trains only "
                  "the seeing, so the visual score is read against it.", ""]
    lines += ["S1.1, S1.2 and S1.3 (stage `s1.3++`: the tiny model has attention experts, EViP++, so its visual "
              "tokens train attention of their own) freeze the whole LLM, so text-only logits should stay "
              "bit-identical; S2 trains everything. The table measures it rather than assuming it.", "",
              "![visual accuracy](visual.png)", "", "![text accuracy](text.png)", ""]
    return "\n".join(lines)


def write_charts(out: Path, results: list[StageResult]) -> list[Path]:
    """visual.png (visual accuracy per stage, both chains, chance line) and text.png (text accuracy per stage)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name, get, chance in (("visual", lambda r: r.visual, visual_chance()),
                              ("text", lambda r: r.scores.get("text_lm"), None)):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for chain, style in (("delta", "o-"), ("full", "s--")):
            rs = [r for r in _ordered(results, chain) if get(r) is not None]
            ax.plot([r.stage for r in rs], [100 * get(r) for r in rs], style, label=f"{chain} tuning")
        if chance is not None:
            ax.axhline(100 * chance, color="grey", linestyle=":", label="chance")
        ax.set_ylabel(f"{name} accuracy (%)")
        ax.set_ylim(0, 100)
        ax.legend()
        fig.tight_layout()
        paths.append(out / f"{name}.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def write_report(out: Path, results: list[StageResult], *, seconds: float, scale: str, steps_scale: float) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps([dict(vars(r), visual=r.visual) for r in results], indent=2) + "\n")
    write_charts(out, results)
    path = out / "report.md"
    path.write_text(report_markdown(results, seconds=seconds, scale=scale, steps_scale=steps_scale))
    return path
