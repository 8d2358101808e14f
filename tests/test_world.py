"""The synthetic world: determinism, held-out separation, the trainer's and VLMEvalKit's formats, true answers
(stage 0's reading and recall drills: test_world_reading.py)."""
from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import random
import re
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from monovl.world import generate_world, world_texts
from monovl.world import data as D
from monovl.world.images import COLOURS, IMAGE_SIZES, TILE, render, sample_scene, sample_style


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _tsv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_same_seed_same_bytes_other_seed_differs(world, tmp_path):
    result = generate_world(tmp_path / "again", seed=0, scale="small")
    assert _hashes(world) == _hashes(tmp_path / "again")
    assert set(result["paths"]) >= {"s1_1", "s1_1_shards", "s1_2", "s1_3", "s2", "s2_meta", "text", "text_heldout",
                                    "bench_mc", "bench_yesno", "bench_open", "bench_text", "manifest",
                                    "bench_described_mc", "bench_described_yesno", "bench_described_open"}
    generate_world(tmp_path / "other", seed=1, scale="small")
    other = _hashes(tmp_path / "other")
    assert other.keys() == _hashes(world).keys()
    assert other["s1_2/pairs.jsonl"] != _hashes(world)["s1_2/pairs.jsonl"]


def test_heldout_images_never_in_training(world):
    train = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (world / "images/train").glob("*.png")}
    held = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (world / "images/heldout").glob("*.png")}
    assert train and held and not train & held
    for rel in ("s1_1/pairs.jsonl", "s1_2/pairs.jsonl", "s1_3/conversations.jsonl", "s2/conversations.jsonl"):
        for row in _jsonl(world / rel):
            images = row.get("image", [])
            for image in [images] if isinstance(images, str) else images:
                assert image.startswith("../images/train/"), (rel, image)
                assert (world / rel).parent.joinpath(image).is_file()
    for rel in ("s1_1/heldout.jsonl", "s1_3/heldout.jsonl"):
        assert all(row["image"].startswith("../images/heldout/") for row in _jsonl(world / rel))
    for name in ("mc", "yesno", "open"):
        for row in _tsv(world / f"bench/{name}.tsv"):
            if len(row["image"]) > 64:
                digest = hashlib.sha256(base64.b64decode(row["image"])).hexdigest()
                assert digest in held and digest not in train


def test_single_shape_concepts_name_the_one_shape_drawn(world):
    rows = _jsonl(world / "s1_1/single.jsonl")
    manifest = json.loads((world / "world.json").read_text())
    assert len(rows) == manifest["counts"]["s1_1_single"] == manifest["sizes"]["single"] > 0
    held = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (world / "images/heldout").glob("*.png")}
    r = random.Random("monovl-world/0/single")  # the stream it was drawn from: its scenes, again
    for row in rows:
        scene = sample_scene(r, max_shapes=1, text_prob=0)
        sample_style(r)
        (shape,) = scene.shapes
        assert row["caption"] == f"A {shape.size} {shape.colour} {shape.kind}." and scene.text is None
        png = (world / "s1_1" / row["image"]).read_bytes()
        assert hashlib.sha256(png).hexdigest() not in held
        assert Image.open(io.BytesIO(png)).size == (scene.width, scene.height)


def test_word_pictures_caption_the_written_word_only(world):
    rows = _jsonl(world / "s1_1/words.jsonl")
    manifest = json.loads((world / "world.json").read_text())
    assert len(rows) == manifest["counts"]["s1_1_words"] == manifest["sizes"]["single"] > 0
    held = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (world / "images/heldout").glob("*.png")}
    r, scenes = random.Random("monovl-world/0/words"), []
    while len(scenes) < len(rows):
        scene = sample_scene(r, max_shapes=1, text_prob=1)
        style = sample_style(r)
        if scene.text is not None:
            scenes.append((scene, style))
    for row, (scene, style) in zip(rows, scenes):
        what = "number" if scene.text.isdigit() else "word"
        where = f"at the {scene.text_position} in {scene.text_colour}"
        assert row["caption"] == f'The {what} "{scene.text}" is written {where}.'
        png = (world / "s1_1" / row["image"]).read_bytes()
        assert hashlib.sha256(png).hexdigest() not in held
        assert Image.open(io.BytesIO(png)).tobytes() == render(scene, style).tobytes()


def test_tar_shards_hold_png_and_caption(world):
    pairs = _jsonl(world / "s1_1/pairs.jsonl")
    shards = sorted((world / "s1_1/shards").glob("shard-*.tar"))
    assert [p.name for p in shards][0] == "shard-000000.tar" and len(shards) == 3
    captions = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.rsplit(".", 1)
                data = tar.extractfile(m).read()
                if ext == "png":
                    assert Image.open(io.BytesIO(data)).size in IMAGE_SIZES
                else:
                    captions[key] = data.decode()
    assert [captions[k] for k in sorted(captions)] == [p["caption"] for p in pairs]


def test_conversations_format(world):
    kinds = set()
    for row in _jsonl(world / "s2/conversations.jsonl"):
        images = row.get("image")
        n = 0 if images is None else 1 if isinstance(images, str) else len(images)
        kinds.add(n)
        conv = row["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert sum(t["value"].count("<image>") for t in conv) == n
        assert all(t["value"] for t in conv)
    assert kinds == {0, 1, 2}  # text-only, single image (multi-turn), multi-image
    meta = json.loads((world / "s2/meta.json").read_text())["synthetic_s2"]
    assert meta["length"] == len(_jsonl(world / "s2" / meta["annotation"]))
    first = next(r["image"] for r in _jsonl(world / "s2/conversations.jsonl") if isinstance(r.get("image"), str))
    assert (world / "s2" / meta["root"] / first).is_file()  # root: relative to the meta file
    assert all(set(r) == {"text"} and r["text"] for r in _jsonl(world / "text/corpus.jsonl"))
    chat = [t for r in _jsonl(world / "text/chat.jsonl") for t in r["conversations"]]
    assert chat and not any("<image>" in t["value"] for t in chat)
    answers = {t["value"] for t in chat if t["from"] == "gpt"}
    assert {"Yes", "No"} & answers and set("ABCD") & answers  # the stage formats, learnt before any image


def test_lookups_are_the_s1_3_rows_that_find_an_object_by_colour_shape_or_place(world):
    rows = _jsonl(world / "s1_3/conversations.jsonl")
    lookups = _jsonl(world / "s1_3/lookups.jsonl")
    assert 0 < len(lookups) < len(rows) and all(r in rows for r in lookups)  # the same rows, same ids and bytes
    asks = re.compile(r"<image>\n(What colour is the|Is the \w+ \w+\?|What shape is the|Is the \w+ object a |"
                      r"Where is the|Is the \w+ \w+ at the)")
    kept = {r["id"] for r in lookups}
    for r in rows:  # a row is kept exactly when its question is one of those look-ups, in any answer format
        assert bool(asks.match(r["conversations"][0]["value"])) == (r["id"] in kept), r


def test_tokenizer_on_world_texts_keeps_the_template_short(world, tmp_path):
    from monovl.template import DEFAULT_SYSTEM_MESSAGE
    from monovl.tokenizer import build_bpe_tokenizer
    from monovl.world import world_texts

    tokenizer = build_bpe_tokenizer(world_texts(world), 512, tmp_path)
    # the system message that every rendered sample carries: a few ids, not ~170 byte-level ones
    assert len(tokenizer.encode(DEFAULT_SYSTEM_MESSAGE)) < len(DEFAULT_SYSTEM_MESSAGE.encode()) / 10


def test_benchmarks_vlmevalkit_tsv(world):
    mc = _tsv(world / "bench/mc.tsv")
    assert list(mc[0]) == ["index", "image", "question", "A", "B", "C", "D", "answer", "category"]
    assert len({r["index"] for r in mc}) == len(mc)
    for r in mc:
        assert r["answer"] in "ABCD" and len({r[k] for k in "ABCD"}) == 4
        if len(r["image"]) <= 64:  # a reference to an earlier row that holds the image
            assert len(mc[int(r["image"])]["image"]) > 64
    assert {r["category"] for r in mc} >= {"colour", "shape", "count", "position"}
    yesno = _tsv(world / "bench/yesno.tsv")
    assert {r["answer"] for r in yesno} == {"Yes", "No"}
    text = _tsv(world / "bench/text.tsv")
    assert "image" not in text[0] and {r["category"] for r in text} == {"fact", "arithmetic"}
    for r in text:
        m = re.fullmatch(r"What is (\d+) (plus|minus) (\d+)\?", r["question"])
        if m:
            a, b = int(m[1]), int(m[3])
            assert int(r["answer"]) == (a + b if m[2] == "plus" else a - b)
    corpus = (world / "text/corpus.jsonl").read_text()
    assert all(r["answer"] in corpus for r in text if r["category"] == "fact")  # facts are learnable
    base64.b64decode(mc[0]["image"], validate=True)


def test_described_benchmarks_ask_the_same_questions_of_the_caption(world):
    captions = {(world / "s1_2" / row["image"]).resolve().read_bytes(): row["caption"]
                for row in _jsonl(world / "s1_2/heldout.jsonl")}  # held-out image → its accurate caption
    checked = 0
    for kind in ("mc", "yesno", "open"):
        rows, described = _tsv(world / f"bench/{kind}.tsv"), _tsv(world / f"bench/described/{kind}.tsv")
        assert len(rows) == len(described) and "image" not in described[0]
        for r, d in zip(rows, described):
            assert {k: v for k, v in r.items() if k not in ("image", "question")} == \
                {k: v for k, v in d.items() if k != "question"}
            caption, question = d["question"].removeprefix("Here is a picture: ").split("\n")
            assert question == r["question"]
            png = base64.b64decode(r["image"] if len(r["image"]) > 64 else rows[int(r["image"])]["image"])
            if png in captions:
                assert caption == captions[png]
                checked += 1
    assert checked > 0


def test_answers_match_the_pixels():
    rng = random.Random(3)
    for _ in range(40):
        scene = sample_scene(rng)
        img = render(scene)
        assert img.size in IMAGE_SIZES and img.width % TILE == 0 and img.height % TILE == 0
        for qa in D.questions(scene):
            if qa.category == "colour":
                shape = next(s for s in scene.shapes if qa.question == f"What colour is the {s.kind}?")
                assert img.getpixel((shape.cx, shape.cy)) == COLOURS[qa.answer]
            if qa.category == "position":
                shape = next(s for s in scene.shapes if s.name in qa.question)
                row, col = int(3 * shape.cy / scene.height), int(3 * shape.cx / scene.width)
                assert D.POSITIONS[3 * row + col] == qa.answer
            if qa.question == "How many shapes are there in the picture?":
                assert int(qa.answer) == len(scene.shapes)


def test_vocabulary_small_and_shared(world):
    words = {w for text in world_texts(world) for w in re.findall(r"[a-z]+", text.lower())}
    assert len(words) < 300
    assert {"circle", "red", "capital", "plus"} <= words
    caption_words = {w for r in _jsonl(world / "s1_2/pairs.jsonl") for w in re.findall(r"[a-z]+", r["caption"])}
    corpus_words = {w for r in _jsonl(world / "text/corpus.jsonl") for w in re.findall(r"[a-z]+", r["text"])}
    assert len(caption_words & corpus_words) > 0.8 * len(caption_words)


def test_cli_and_bad_scale(tmp_path, capsys):
    from monovl.cli import main

    assert main(["world", str(tmp_path / "w"), "--scale", "small", "--seed", "2"]) == 0
    manifest = json.loads((tmp_path / "w/world.json").read_text())
    assert manifest["seed"] == 2 and manifest["counts"]["bench_mc"] > 0
    assert "synthetic world" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown world scale"):
        generate_world(tmp_path / "x", scale="huge")


def test_plain_questions_get_short_sentences():
    from monovl.world.images import Scene, Shape

    scene = Scene(112, 112, "white", "plain", (Shape("circle", "red", "small", (0, 0), 18, 18, 8),
                                                Shape("star", "blue", "large", (2, 2), 90, 90, 12)), "sun", (1, 1),
                  "black")
    sentences = {qa.question: qa.sentence for qa in D.questions(scene)}
    assert sentences["What colour is the circle?"] == "The circle is red."
    assert sentences["What shape is the blue object?"] == "The blue object is a star."
    assert sentences["How many shapes are there in the picture?"] == "There are 2 shapes in the picture."
    assert sentences["How many circles are there?"] == "There is one circle."
    assert sentences["How many squares are there?"] == "There are no squares."  # the first absent kind
    assert sentences["Where is the blue star?"] == "The blue star is at the bottom right."
    assert sentences["What word is written in the picture?"] == 'The word "sun" is written in the picture.'
    turns = D.plain_conversation(scene, random.Random(0))
    assert turns[0]["value"].startswith("<image>")
    for q, a in zip(turns[0::2], turns[1::2]):
        question = q["value"].removeprefix("<image>\n")
        assert a["value"] == sentences.get(question, D.describe(scene))


def test_eval_scale_writes_benchmarks_only(tmp_path):
    result = generate_world(tmp_path / "w", seed=1, scale="eval")
    counts = result["counts"]
    assert counts["bench_mc"] == counts["bench_yesno"] == counts["bench_open"] == 300
    assert counts["train_images"] == counts["s1_3"] == counts["reading"] == 0


def test_styles_vary_training_images_only_and_keep_the_answers():
    from monovl.world.images import Style, sample_style

    rng = random.Random(5)
    styles = [sample_style(rng) for _ in range(200)]
    assert 60 < sum(s == Style() for s in styles) < 140  # about half keep the world's own look
    assert any(s.supersample > 1 for s in styles) and any(s.outline for s in styles) and any(s.pure_white for s in styles)
    for _ in range(30):
        scene = sample_scene(rng)
        style = Style(supersample=4, outline=2, outline_black=True, pure_white=True, tint=(20, -20, 10))
        img = render(scene, style)
        assert img.size == (scene.width, scene.height)
        for s in scene.shapes:
            if s.kind in ("circle", "square", "hexagon", "diamond") and s.r >= 10:  # the centre keeps the tinted fill
                want = tuple(max(0, min(255, v + t)) for v, t in zip(COLOURS[s.colour], style.tint))
                assert max(abs(a - b) for a, b in zip(img.getpixel((s.cx, s.cy)), want)) <= 2
        if scene.background == "white" and scene.pattern == "plain":
            assert img.getpixel((0, 0)) == (255, 255, 255)


def test_heldout_images_keep_the_worlds_look_and_training_images_vary(world):
    manifest = json.loads((world / "world.json").read_text())
    from monovl.world import _scenes, _Writer
    from monovl.world.images import png_bytes

    # the held-out PNGs are exactly the default renderer's; some training PNGs are not
    streams = _Writer(world, manifest["seed"])  # the world's own random streams
    scenes = _scenes(streams.rng("heldout"), manifest["counts"]["heldout_images"], set())
    for i, scene in enumerate(scenes):
        assert (world / f"images/heldout/{i:06d}.png").read_bytes() == png_bytes(render(scene))
    train = _scenes(streams.rng("train"), manifest["counts"]["train_images"], set(scenes))
    differ = [(world / f"images/train/{i:06d}.png").read_bytes() != png_bytes(render(s)) for i, s in enumerate(train)]
    assert 0 < sum(differ) < len(differ)


def test_captions_list_shapes_in_reading_order():
    rng = random.Random(11)
    for _ in range(50):
        scene = sample_scene(rng)
        caption = D.describe(scene)
        found = [caption.index(f"{s.kind} ({s.colour}) at the {s.position}") for s in scene.shapes]
        cells = [s.cell for s in scene.shapes]
        assert [c for _, c in sorted(zip(found, cells))] == sorted(cells)


def test_clean_drawings_benchmark(world):
    from monovl.world.clean import CSS

    rows = _tsv(world / "bench/clean/mc.tsv")
    assert len(rows) == 20 and {r["category"] for r in rows} == {"colour", "shape", "count"}
    for r in rows:
        img = Image.open(io.BytesIO(base64.b64decode(r["image"]))).convert("RGB")
        assert img.getpixel((0, 0)) == (255, 255, 255)
        answer = r[r["answer"]]
        assert len({r[k] for k in "ABCD"}) == 4
        pixels = set(img.get_flattened_data())
        if r["category"] == "colour":
            assert CSS[answer] in pixels
        if r["category"] == "count":
            assert 1 <= int(answer) <= 3
