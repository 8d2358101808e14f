"""A seeded synthetic world for training and evaluating tiny monolithic models end to end.

`generate_world(out_dir, seed=0, scale="default")` writes, deterministically (same seed → same bytes):

    images/train/*.png, images/heldout/*.png        rendered scenes (held-out ones never used for training)
    s1_1/pairs.jsonl, s1_1/shards/shard-*.tar      noisy alt-text pairs (S1.1)
    images/single/*.png, s1_1/single.jsonl          one shape per picture, captioned "A large red star." (S1.1)
    images/words/*.png, s1_1/words.jsonl            one written word or number (and one shape), captioned by it
    s1_2/pairs.jsonl                                accurate detailed captions (S1.2)
    s1_3/conversations.jsonl (+ meta.json)          task data: colour/shape/count/position/OCR/grounding (S1.3)
    s1_3/lookups.jsonl                              its rows that ask an object's colour, shape or place
    s2/conversations.jsonl, s2/meta.json            multi-turn, multi-image and text-only instructions (S2)
    s2/plain.jsonl                                  plainly asked questions, answered in a sentence (S2)
    text/corpus.jsonl                               invented facts, arithmetic, descriptions (base LLM)
    text/chat.jsonl                                 text-only chat in the stage formats (the base LLM's tuning)
    text/reading.jsonl, text/reading_chat.jsonl     reading practice: described scenes and questions (stage 0)
    text/recall.jsonl, text/recall_gaps.jsonl       associative recall, stage 0's warm-up (loss on the values)
    text/recall_choice.jsonl                        recall asked as multiple choice and yes/no (loss on the answers)
    */heldout.jsonl                                 held-out split of each of the above
    bench/{mc,yesno,open,text}.tsv                  VLMEvalKit benchmarks on held-out images / facts
    bench/described/{mc,yesno,open}.tsv             the visual benchmarks with each image given as its caption
    bench/clean/mc.tsv                              colour/shape/count on plain Pillow drawings (another renderer)
    world.json                                      manifest: seed, scale, vocabulary, counts, paths
"""
from __future__ import annotations

import csv
import io
import json
import logging
import random
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from monovl.checks import write_failed, writable_dir
from monovl.world import data as D, recall as R
from monovl.world.clean import clean_bench
from monovl.world.images import (BACKGROUNDS, COLOURS, IMAGE_SIZES, NUMBERS, PATTERNS, POSITIONS, SHAPES, SIZES,
                                 TILE, WORDS, Scene, Style, b64, png_bytes, render, sample_scene,
                                 sample_style)

log = logging.getLogger(__name__)

__all__ = ["WorldScale", "SCALES", "generate_world", "world_texts", "register"]


@dataclass(frozen=True)
class WorldScale:
    train_images: int
    heldout_images: int
    s1_3: int  # conversations
    s2: int
    text: int  # corpus lines
    chat: int  # text-only chat conversations (stage 0)
    reading: int  # reading drills and reading conversations, each (stage 0)
    single: int  # one-shape pictures with concept captions, and as many one-word pictures
    heldout: int  # held-out samples per stage
    bench: int  # rows per visual benchmark
    shard_size: int


SCALES = {
    "small": WorldScale(train_images=24, heldout_images=12, s1_3=40, s2=30, text=80, chat=40, reading=40,
                        single=12, heldout=8, bench=20, shard_size=10),
    "default": WorldScale(train_images=3000, heldout_images=300, s1_3=6000, s2=3000, text=8000, chat=4000,
                          reading=100000, single=3000, heldout=200, bench=300, shard_size=500),
    # more images and image-text samples (same texts and benchmarks): for long runs that would repeat the default's
    "large": WorldScale(train_images=20000, heldout_images=300, s1_3=60000, s2=20000, text=8000, chat=4000,
                        reading=100000, single=30000, heldout=200, bench=300, shard_size=1000),
    # held-out benchmarks only (no training data): what `monovl demo` evaluates, on a seed the model never saw
    "eval": WorldScale(train_images=0, heldout_images=300, s1_3=0, s2=0, text=0, chat=0, reading=0, single=0,
                       heldout=1, bench=300, shard_size=500),
}


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_tar_shards(folder: Path, samples: list[tuple[str, bytes, str]], shard_size: int) -> list[Path]:
    """WebDataset shards `shard-000000.tar` of KEY.png + KEY.txt; fixed headers make them reproducible."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for start in range(0, len(samples), shard_size):
        path = folder / f"shard-{start // shard_size:06d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, png, caption in samples[start:start + shard_size]:
                for name, data in ((f"{key}.png", png), (f"{key}.txt", caption.encode("utf-8"))):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def write_tsv(path: Path, rows: list[dict], columns: list[str]) -> int:
    """A VLMEvalKit TSV (tab-separated, minimal quoting)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, delimiter="\t", quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return len(rows)


CATEGORIES = ("colour", "shape", "count", "position", "ocr")
LOOKUPS = ("colour", "shape", "position")  # the categories that find an object named by another of its attributes
MC_COLUMNS = ["index", "image", "question", "A", "B", "C", "D", "answer", "category"]
QA_COLUMNS = ["index", "image", "question", "answer", "category"]


def _scenes(rng: random.Random, n: int, exclude: set[Scene]) -> list[Scene]:
    out: list[Scene] = []
    while len(out) < n:
        scene = sample_scene(rng)
        if scene not in exclude:
            out.append(scene)
    return out


def _write_images(folder: Path, scenes: list[Scene], rng: random.Random | None = None) -> list[bytes]:
    """PNGs of `scenes`, each in a style sampled from `rng` (None: the world's own look)."""
    folder.mkdir(parents=True, exist_ok=True)
    pngs = [png_bytes(render(s, sample_style(rng) if rng else Style())) for s in scenes]
    for i, png in enumerate(pngs):
        (folder / f"{i:06d}.png").write_bytes(png)
    return pngs


def _visual_bench(kind: str, scenes: list[Scene], pngs: list[bytes], n: int,
                  rng: random.Random) -> tuple[list[dict], list[dict]]:
    """`n` rows balanced over the categories (a repeated image is stored once and referenced by index), and the
    same rows with the image given as its caption before the question instead (text-only: reading comprehension,
    what a text LLM answers with perfect perception)."""
    by_cat = {c: [(j, qa) for j, s in enumerate(scenes) for qa in D.questions(s) if qa.category == c]
              for c in CATEGORIES}
    cats = [c for c in CATEGORIES if by_cat[c]]
    rows, described, first_row = [], [], {}
    for k in range(n):
        j, qa = rng.choice(by_cat[cats[k % len(cats)]])
        row = {"index": k, "image": str(first_row[j]) if j in first_row else b64(pngs[j]), "category": qa.category}
        first_row.setdefault(j, k)
        if kind == "mc":
            options, row["answer"] = D.as_choice(qa, rng)
            row.update(question=qa.question, **dict(zip(D.LETTERS, options)))
        elif kind == "yesno":
            row["question"], row["answer"] = D.as_yesno(qa, rng)
        else:
            row["question"], row["answer"] = qa.question, qa.answer
        rows.append(row)
        described.append({k: v for k, v in row.items() if k != "image"}
                         | {"question": D.described(scenes[j], row["question"])})
    return rows, described


@dataclass
class _Writer:
    """Where a world is written, what has been written (files and row counts), and its seeded random streams."""
    out: Path
    seed: int
    files: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)

    def rng(self, name: str) -> random.Random:  # an independent stream per part: parts do not shift each other
        return random.Random(f"monovl-world/{self.seed}/{name}")

    def jsonl(self, name: str, rel: str, rows: Iterable[dict]) -> None:
        self.files[name], self.counts[name] = rel, write_jsonl(self.out / rel, rows)

    def tsv(self, name: str, rel: str, rows: list[dict], columns: list[str]) -> None:
        self.files[name], self.counts[name] = rel, write_tsv(self.out / rel, rows, columns)


def _img(split: str, i: int) -> str:
    return f"../images/{split}/{i:06d}.png"


def _image_stages(w: _Writer, sc: WorldScale, split: str, scenes: list[Scene], pngs: list[bytes], facts, sums) -> None:
    """S1.1, S1.2, S1.3 and S2 data of one split (train, or the held-out samples of each stage)."""
    train = split == "train"
    name, stem, n = ("", "conversations", len(scenes)) if train else ("_heldout", "heldout", sc.heldout)
    r = w.rng(f"s1_1{name}")
    s11 = [{"image": _img(split, i % len(scenes)), "caption": D.alt_text(scenes[i % len(scenes)], r)} for i in range(n)]
    w.jsonl(f"s1_1{name}", f"s1_1/{'pairs' if train else 'heldout'}.jsonl", s11)
    w.jsonl(f"s1_2{name}", f"s1_2/{'pairs' if train else 'heldout'}.jsonl",
            ({"image": _img(split, i % len(scenes)), "caption": D.describe(scenes[i % len(scenes)])} for i in range(n)))
    if train:
        shards = write_tar_shards(w.out / "s1_1/shards", [(f"{i:06d}", pngs[i], row["caption"])
                                                         for i, row in enumerate(s11)], sc.shard_size)
        w.files["s1_1_shards"], w.counts["s1_1_shards"] = "s1_1/shards", len(shards)
    r = w.rng(f"s1_3{name}")
    s13 = [D.s1_3_conversation(scenes[k % len(scenes)], r) for k in range(sc.s1_3 if train else n)]
    rows = [{"id": f"s1_3{name}-{k:06d}", "image": _img(split, k % len(scenes)), "conversations": c}
            for k, (c, _) in enumerate(s13)]
    w.jsonl(f"s1_3{name}", f"s1_3/{stem}.jsonl", rows)
    if train:  # the same rows, only those that look an object up by another attribute: its colour, shape, place
        w.jsonl("s1_3_lookups", "s1_3/lookups.jsonl", (row for row, (_, cat) in zip(rows, s13) if cat in LOOKUPS))
    r, s2 = w.rng(f"s2{name}"), []
    for k in range(sc.s2 if train else n):
        roll, row = r.random(), {"id": f"s2{name}-{k:06d}"}
        picks = [] if roll < 0.3 else [r.randrange(len(scenes)) for _ in range(2 if roll < 0.55 else 1)]
        if picks:
            row["image"] = [_img(split, i) for i in picks] if len(picks) == 2 else _img(split, picks[0])
        row["conversations"] = D.s2_conversation([scenes[i] for i in picks], facts, sums, r)
        s2.append(row)
    w.jsonl(f"s2{name}", f"s2/{stem}.jsonl", s2)
    if train:  # its own stream: the files above (and the tokenizer trained on them) stay as they were
        r = w.rng("s2_plain")
        w.jsonl("s2_plain", "s2/plain.jsonl", ({"id": f"s2_plain-{k:06d}", "image": _img(split, k % len(scenes)),
                                                "conversations": D.plain_conversation(scenes[k % len(scenes)], r)}
                                               for k in range(sc.s2 // 2)))


def _one_subject(w: _Writer, sc: WorldScale, exclude: set[Scene], name: str) -> None:
    """Pictures of one subject, varied drawing, each in its own random stream: "single", one shape and no written
    word, captioned by kind (the concept that an outline names a word, which captions of busy scenes teach a small
    model slowly); "words", a written word or number beside one shape, captioned by the word's sentence only."""
    r = w.rng(name)
    scenes, pngs = [], []
    while len(scenes) < sc.single:
        scene = sample_scene(r, max_shapes=1, text_prob=0 if name == "single" else 1)
        style = sample_style(r)
        if scene not in exclude and (name == "single" or scene.text is not None):
            scenes.append(scene)
            pngs.append(png_bytes(render(scene, style)))
    (w.out / "images" / name).mkdir(parents=True, exist_ok=True)
    for i, png in enumerate(pngs):
        (w.out / "images" / name / f"{i:06d}.png").write_bytes(png)
    caption = D.concept_caption if name == "single" else D.written_caption
    w.jsonl(f"s1_1_{name}", f"s1_1/{name}.jsonl",
            ({"image": _img(name, i), "caption": caption(s)} for i, s in enumerate(scenes)))


def _meta_files(w: _Writer) -> None:
    """The official meta JSON of S1.3 and S2; root and annotation relative to the meta file."""
    for stage in ("s1_3", "s2"):
        meta = {f"synthetic_{stage}": {"root": ".", "annotation": "conversations.jsonl", "repeat_time": 1,
                                       "length": w.counts[stage]}}
        if stage == "s2":
            meta["synthetic_s2_plain"] = {"root": ".", "annotation": "plain.jsonl", "repeat_time": 1,
                                          "length": w.counts["s2_plain"]}
        (w.out / stage / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        w.files[f"{stage}_meta"] = f"{stage}/meta.json"


def _text_files(w: _Writer, sc: WorldScale, facts, sums, held_sums) -> None:
    """Stage 0's texts: corpus, text-only chat, reading practice, and the held-out corpus lines."""
    r = w.rng("text")
    kinds = r.choices(("fact", "arithmetic", "scene"), weights=(4, 3, 3), k=sc.text)
    w.jsonl("text", "text/corpus.jsonl", ({"text": D.corpus_line(k, facts, sums, r)} for k in kinds))
    r = w.rng("chat")
    w.jsonl("chat", "text/chat.jsonl", ({"id": f"chat-{k:06d}", "conversations": D.chat_conversation(facts, sums, r)}
                                        for k in range(sc.chat)))
    r = w.rng("reading")
    w.jsonl("reading", "text/reading.jsonl",
            ({"text": D.reading_drill(sample_scene(r), r)} for _ in range(sc.reading)))
    r = w.rng("reading_chat")
    w.jsonl("reading_chat", "text/reading_chat.jsonl",
            ({"id": f"reading-{k:06d}", "conversations": D.reading_conversation(sample_scene(r), r)}
             for k in range(sc.reading)))
    r = w.rng("recall")
    keys, values = R.recall_vocabulary(facts, r)
    w.jsonl("recall", "text/recall.jsonl", (R.recall_drill(keys, values, r) for _ in range(sc.reading // 4)))
    w.jsonl("recall_gaps", "text/recall_gaps.jsonl",
            (R.recall_drill(keys, values, r, gaps=R.RECALL_GAPS) for _ in range(sc.reading // 4)))
    r = w.rng("recall_choice")  # its own stream: the files above stay as they were
    w.jsonl("recall_choice", "text/recall_choice.jsonl",
            (R.recall_choice(keys, values, r) for _ in range(sc.reading // 4)))
    r = w.rng("text_heldout")
    w.jsonl("text_heldout", "text/heldout.jsonl",
            ({"text": D.corpus_line(k, facts, held_sums, r, heldout=True)} for k in kinds[:sc.heldout]))


def _bench_files(w: _Writer, sc: WorldScale, heldout: list[Scene], held_png: list[bytes], facts, held_sums) -> None:
    for kind in ("mc", "yesno", "open"):
        rows, described = _visual_bench(kind, heldout, held_png, sc.bench, w.rng(f"bench_{kind}"))
        columns = MC_COLUMNS if kind == "mc" else QA_COLUMNS
        w.tsv(f"bench_{kind}", f"bench/{kind}.tsv", rows, columns)
        w.tsv(f"bench_described_{kind}", f"bench/described/{kind}.tsv", described,
              [c for c in columns if c != "image"])
    w.tsv("bench_clean", "bench/clean/mc.tsv", clean_bench(w.rng("bench_clean"), sc.bench), MC_COLUMNS)
    r = w.rng("bench_text")
    text_rows = [(f.question, f.answer, "fact") for f in r.sample(facts, min(len(facts), sc.bench // 2))]
    text_rows += [(q, a, "arithmetic") for q, a in held_sums[:sc.bench - len(text_rows)]]
    w.tsv("bench_text", "bench/text.tsv", [{"index": i, "question": q, "answer": a, "category": c}
                                           for i, (q, a, c) in enumerate(text_rows)],
          ["index", "question", "answer", "category"])


def generate_world(out_dir: str | Path, *, seed: int = 0, scale: str = "default") -> dict:
    """Write the whole world under `out_dir`; return {"root", "paths": {name: path}, "counts": {name: n}}."""
    if scale not in SCALES:
        raise ValueError(f"unknown world scale {scale!r}; choose one of {', '.join(SCALES)}")
    sc, w = SCALES[scale], _Writer(Path(out_dir), seed)
    w.out.mkdir(parents=True, exist_ok=True)
    heldout = _scenes(w.rng("heldout"), sc.heldout_images, set())
    train = _scenes(w.rng("train"), sc.train_images, set(heldout))
    log.info("rendering %d training and %d held-out images", len(train), len(heldout))
    # training images vary the drawing (anti-aliasing, outlines, pure white, tints); held-out ones keep the world's look
    train_png = _write_images(w.out / "images/train", train, w.rng("style"))
    held_png = _write_images(w.out / "images/heldout", heldout)
    facts = D.invent_facts(w.rng("facts"))
    sums, held_sums = D.arithmetic_pairs(w.rng("arithmetic"))
    _image_stages(w, sc, "train", train, train_png, facts, sums)
    _image_stages(w, sc, "heldout", heldout, held_png, facts, held_sums)
    _one_subject(w, sc, set(heldout), "single")
    _one_subject(w, sc, set(heldout), "words")
    _meta_files(w)
    _text_files(w, sc, facts, sums, held_sums)
    _bench_files(w, sc, heldout, held_png, facts, held_sums)
    w.counts.update(train_images=len(train), heldout_images=len(heldout))
    w.files.update(train_images="images/train", heldout_images="images/heldout", manifest="world.json")
    manifest = {"seed": seed, "scale": scale, "sizes": asdict(sc), "tile_size": TILE, "image_sizes": IMAGE_SIZES,
                "vocabulary": {"colours": list(COLOURS), "shapes": list(SHAPES), "sizes": list(SIZES),
                               "positions": list(POSITIONS), "backgrounds": list(BACKGROUNDS),
                               "patterns": list(PATTERNS), "words": list(WORDS), "numbers": list(NUMBERS)},
                "counts": w.counts, "files": w.files}
    (w.out / "world.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return {"root": str(w.out), "paths": {k: str(w.out / v) for k, v in w.files.items()}, "counts": w.counts}


def world_texts(out_dir: str | Path) -> Iterator[str]:
    """Every training text of a generated world (captions, conversation turns, corpus), for the tokenizer; each
    image sample also gives the chat template's default system message, which the trainer renders into it."""
    from monovl.template import DEFAULT_SYSTEM_MESSAGE

    out = Path(out_dir)
    for rel in ("s1_1/pairs.jsonl", "s1_2/pairs.jsonl"):
        with open(out / rel, encoding="utf-8") as f:
            for line in f:
                yield from (DEFAULT_SYSTEM_MESSAGE, json.loads(line)["caption"])
    for rel in ("s1_3/conversations.jsonl", "s2/conversations.jsonl", "text/chat.jsonl"):
        with open(out / rel, encoding="utf-8") as f:
            for line in f:
                yield DEFAULT_SYSTEM_MESSAGE
                for turn in json.loads(line)["conversations"]:
                    yield turn["value"].replace("<image>\n", "").replace("<image>", "")
    with open(out / "text/corpus.jsonl", encoding="utf-8") as f:
        yield from (json.loads(line)["text"] for line in f)


def _cmd_world(args) -> int:
    out = writable_dir(args.out_dir, "world folder")  # a file, read-only, no permission: before any work
    try:
        result = generate_world(out, seed=args.seed, scale=args.scale)
    except OSError as e:  # e.g. the disk filled up
        raise write_failed(e, out, "world folder") from None
    print(f"synthetic world (seed {args.seed}, scale {args.scale}) written to {result['root']}")
    for name, n in result["counts"].items():
        print(f"  {name:16s} {n:7d}  {result['paths'].get(name, '')}")
    return 0


def register(subparsers) -> None:
    """Add `monovl world OUT_DIR [--seed N] [--scale small|default|large|eval]`."""
    p = subparsers.add_parser("world", help="generate the seeded synthetic world: stage data, corpus, benchmarks")
    p.add_argument("out_dir", help="output folder (created)")
    p.add_argument("--seed", type=int, default=0, help="world seed")
    p.add_argument("--scale", choices=sorted(SCALES), default="default", help="world size")
    p.set_defaults(func=_cmd_world)
