"""`monovl.perception`: caption words by class, their tokens, and the right-picture vs other-picture gap."""
import json
import random

import pytest

from monovl import load
from monovl.perception import _caption_tokens, format_table, image_dependence, main, word_classes
from monovl.world import data as D
from monovl.world.images import Scene, Shape, render, sample_scene

CAPTION = ('A wide picture with a dotted grey background. There are two shapes: a large red star (red) at the top '
           'left and a small blue circle (blue) at the centre. The word "cat" is written at the bottom right in black.')


@pytest.fixture(scope="module")
def shipped():
    return load()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    rng, rows = random.Random(3), []
    for i in range(8):
        scene = sample_scene(rng)
        render(scene).save(root / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": D.describe(scene)})
    (root / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "heldout.jsonl"


def test_word_classes_of_a_caption():
    got = {w: c for w, c in zip(CAPTION.split(" "), word_classes(CAPTION)) if c}
    assert got == {"dotted": "background", "grey": "background", "background.": "background", "two": "count",
                   "large": "size", "red": "colour", "star": "shape", "top": "position", "left": "position",
                   "small": "size", "blue": "colour", "circle": "shape", "centre.": "position", '"cat"': "written",
                   "bottom": "position", "right": "position"}
    assert word_classes(CAPTION).count("colour") == 2  # "(red)" repeats a colour: copied, not seen; "black" is ink


def test_describe_uses_the_words_the_classes_know():
    scene = Scene(112, 112, "white", "plain", (Shape("hexagon", "green", "medium", (0, 2), 90, 20, 10),))
    classes = dict(zip(D.describe(scene).split(" "), word_classes(D.describe(scene))))
    assert classes["green"] == "colour" and classes["hexagon"] == "shape" and classes["one"] == "count"


def test_caption_tokens_are_the_caption_and_belong_to_their_words(shipped):
    _, tokenizer = shipped
    ids, owner = _caption_tokens(tokenizer, CAPTION)
    assert ids == tokenizer.encode(CAPTION, add_bos=False)
    text = {c: "".join(tokenizer.decode([i]) for i, o in zip(ids, owner) if o == c) for c in set(owner) - {None}}
    assert text["colour"].split() == ["red", "blue"] and text["shape"].split() == ["star", "circle"]
    assert text["written"].strip() == "cat" and text["count"].strip() == "two"


def test_gap_is_zero_with_the_same_picture_and_positive_for_what_the_model_sees(shipped, pairs):
    model, tokenizer = shipped
    same = image_dependence(model, tokenizer, pairs, shift=0, max_tiles=1)
    assert same and all(w.gap == 0 and w.tokens > 0 for w in same.values())
    other = image_dependence(model, tokenizer, pairs, shift=3, max_tiles=1)
    assert {c: w.loss for c, w in other.items()} == pytest.approx({c: w.loss for c, w in same.items()}, abs=1e-4)
    assert other["background"].gap > 0.5  # the shipped model reads the background off the picture
    assert "| background |" in format_table(other)


def test_cli_prints_the_table_and_refuses_a_missing_file(pairs, capsys):
    main(["--pairs", str(pairs), "--limit", "2", "--max-tiles", "1"])
    assert "| colour |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--pairs", str(pairs.parent / "missing.jsonl")])
