"""Evaluation harness: scoring rules on hand-computed cases, TSV reading, prompts, end-to-end runs."""
import csv
import json

import pytest
import torch

from monovl.cli import main
from monovl.eval import run, scoring
from monovl.eval.benchmarks import (MC_SUFFIX, VQA_SUFFIX, YESNO_SUFFIX, Item, build_prompt, circular_items,
                               load_benchmark, rotate)
from pictures import b64, png


# ---- scoring rules ----
def test_normalize_vqa():
    assert scoring.normalize_vqa("Two dogs!") == "2 dogs"
    assert scoring.normalize_vqa("The cat.") == "cat"
    assert scoring.normalize_vqa("1.5") == "1.5"
    assert scoring.normalize_vqa("dont know") == "don't know"
    assert scoring.normalize_vqa("1,000") == "1000"
    assert scoring.normalize_vqa("red-blue") == "red blue"
    assert scoring.normalize_vqa("yes, sir") == "yes sir"


@pytest.mark.parametrize("text, normalised", [
    # EvalAI's contraction table exactly: these are in it ...
    ("wheres", "where's"), ("whens", "when's"), ("twas", "'twas"), ("somebodys", "somebody's"),
    ("couldnt've", "couldn't've"), ("yall'd've", "y'all'd've"), ("somebody'd", "somebodyd"),
    # ... and these are not (lookup after lower-casing, so "Im" / "Ive" never match either)
    ("im", "im"), ("ive", "ive"), ("lets", "lets"), ("shes", "shes"), ("shed", "shed"), ("wed", "wed"),
    ("Im", "im"),
    # a period next to a digit stays (VLMEvalKit's current pattern); others go
    ("2.", "2."), ("version 3.5.", "version 3.5."), ("end. now", "end now"),
])
def test_normalize_vqa_evalai_tables(text, normalised):
    assert scoring.normalize_vqa(text) == normalised


def test_normalize_vqa_removes_at_most_32_periods():  # VLMEvalKit passes re.UNICODE (32) as `count`
    assert scoring.normalize_vqa(". " * 40).replace(" ", "") == "." * 8


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_ten_answers(matches, expected):
    # k matches: the k left-out matching answers see k-1 others, the 10-k others see k -> mean of min(1, ./3)
    answers = ["two"] * matches + ["three"] * (10 - matches)
    assert scoring.vqa_accuracy("2", answers) == pytest.approx(expected)


def test_vqa_accuracy_single_answer_exact_after_normalisation():
    assert scoring.vqa_accuracy("A Dog.", ["dog"]) == 1.0
    assert scoring.vqa_accuracy("dogs", ["dog"]) == 0.0


def test_anls():
    assert scoring.levenshtein("kitten", "sitting") == 3
    assert scoring.anls("hallo", ["hello"]) == pytest.approx(0.8)  # 1 - 1/5
    assert scoring.anls("HELLO  world", ["hello world"]) == 1.0
    assert scoring.anls("abcd", ["abxy"]) == 0.5  # NL = 2/4 = tau: 1 - NL = 0.5 is not below tau -> kept
    assert scoring.anls("abcde", ["abxyz"]) == 0.0  # NL = 3/5 > tau
    assert scoring.anls("abcd", ["abcx"]) == pytest.approx(0.75)
    assert scoring.anls("xyz", ["nothing", "xya"]) == pytest.approx(2 / 3)  # best reference counts


def test_relaxed_accuracy():
    assert scoring.relaxed_accuracy("104", ["100"]) == 1.0
    assert scoring.relaxed_accuracy("105", ["100"]) == 1.0  # 5 % is inside
    assert scoring.relaxed_accuracy("106", ["100"]) == 0.0
    assert scoring.relaxed_accuracy("12%", ["0.12"]) == 1.0
    assert scoring.relaxed_accuracy("0", ["0"]) == 1.0
    assert scoring.relaxed_accuracy("Paris", ["paris"]) == 1.0
    assert scoring.relaxed_accuracy("Rome", ["paris", "rome"]) == 1.0
    assert scoring.relaxed_accuracy("Lyon", ["paris"]) == 0.0


@pytest.mark.parametrize("prediction, answers, hit", [
    ("1,000", ["1000"], 0.0), ("1000", ["1,000"], 0.0), ("1,000", ["1,000"], 1.0),  # float() has no commas
    ("0.0", ["0"], 0.0), ("0", ["0"], 1.0), ("0.01", ["0"], 0.0),  # reference 0 -> string equality
    (" 5 ", ["5.2"], 1.0),  # the prediction is stripped
    ("5", [" 5"], 1.0), ("abc", [" abc"], 0.0),  # float() strips the reference; string equality does not
])
def test_relaxed_accuracy_vlmevalkit_rules(prediction, answers, hit):
    assert scoring.relaxed_accuracy(prediction, answers) == hit


def test_anls_divides_by_raw_lengths():
    # distance 0 after collapsing spaces, so the length does not matter here ...
    assert scoring.anls("a   b", ["a b"]) == 1.0
    # ... but here: distance("ab", "abc") = 1 over the raw length 6 of "ab    ", not over 3
    assert scoring.anls("ab    ", ["abc"]) == pytest.approx(1 - 1 / 6)
    assert scoring.anls("", [""]) == 1.0


def test_exact_accuracy():
    assert scoring.exact_accuracy(" Yes ", ["yes"]) == 1.0
    assert scoring.exact_accuracy("a dog", ["dog"]) == 0.0  # no EvalAI normalisation
    assert scoring.exact_accuracy("Harry Potter", ["harry potter", "x"]) == 1.0


def test_ocrbench_containment():
    assert scoring.ocrbench_hit("The sign says STOP here", ["stop"]) == 1.0
    assert scoring.ocrbench_hit("go", ["stop", "Go "]) == 1.0
    assert scoring.ocrbench_hit("sto p", ["stop"]) == 0.0
    math = "Handwritten Mathematical Expression Recognition"
    assert scoring.ocrbench_hit("x ^ { 2 }", ["x^{2}"], math) == 1.0
    assert scoring.ocrbench_hit("X^{2}", ["x^{2}"], math) == 0.0  # case kept for formulas
    assert scoring.ocrbench_hit("\tx ^ 2\t", ["x^2"], math) == 1.0  # stripped (tabs too) before spaces go
    assert scoring.ocrbench_hit("x^2", ["\tx^2"], math) == 1.0


OPTIONS = {"A": "red", "B": "dark red", "C": "blue", "D": "a green cat"}


@pytest.mark.parametrize("prediction, letter", [
    ("B", "B"), ("(C)", "C"), ("C.", "C"), ("The answer is D.", "D"), ("B. dark red", "B"), ("A", "A"),
    ("The answer is A.", "A"), ("The answer is A", "A"), ("I think the answer is (A).", "A"),
    ("The correct answer is **B**. Here is why: it is the darkest of them all", "B"),
    ("blue", "C"), ("red", "A"), ("bluest", "C"),  # option text: a substring, exactly one option
    ("It is dark red", None),  # "red" and "dark red" both match: no longest-option rule
    ("'A'", None), ('"B"', None), ("`C`", None),  # quotes and backticks are not stripped
    ("A cat sat on it", None),  # the letter is not among the last four tokens
    ("A is right, I believe", None), ("I pick A for sure", "A"),
    ("B or C", None), ("I do not know", None), ("", None), ("Z", "Z"),
    ("Cannot determine the answer", "Z"),
    ("blue " * 40, None),  # longer than twice all option texts: no text rule
])
def test_extract_choice(prediction, letter):
    assert scoring.extract_choice(prediction, OPTIONS) == letter


def test_score_mc_unextractable_is_wrong():
    assert scoring.score_mc("maybe", OPTIONS, "A") == (0.0, None)
    assert scoring.score_mc("blue", OPTIONS, "C") == (1.0, "C")
    assert scoring.score_mc("The answer is A.", OPTIONS, "A") == (1.0, "A")


def test_yes_no():
    assert scoring.extract_yes_no("Yes.") == "yes"
    assert scoring.extract_yes_no("no, it is not") == "no"
    assert scoring.extract_yes_no("yes and no") is None
    assert scoring.extract_yes_no("nothing") is None
    assert scoring.score_yes_no("Yes", "No") == (0.0, "yes")


@pytest.mark.parametrize("prediction, said", [
    ("Yes", "yes"), ("yes.", "yes"), ("Yes, there is one", "yes"), ("No!", "no"), ("(no)", "no"),
    ("**Yes**", None), ("Yes: there is one", None), ("Yes。", None), ("Noël", None), ("no-one", "no"),
])
def test_yes_no_punctuation_as_vlmevalkit(prediction, said):
    assert scoring.extract_yes_no(prediction) == said


def test_mme_acc_plus():
    rows = [("color", "i1", 1.0), ("color", "i1", 1.0), ("color", "i2", 1.0), ("color", "i2", 0.0),
            ("count", "i3", 0.0), ("count", "i3", 0.0)]
    out = scoring.mme_scores(rows)
    assert out["categories"]["color"] == {"acc": 0.75, "acc_plus": 0.5, "score": 125.0}
    assert out["categories"]["count"]["score"] == 0.0
    assert out["score"] == 125.0 and out["perception"] == 125.0 and out["cognition"] == 0


def test_mme_perception_and_cognition():
    rows = [("color", "i1", 1.0), ("color", "i1", 1.0), ("OCR", "i2", 1.0), ("OCR", "i2", 0.0),
            ("code_reasoning", "i3", 1.0), ("code_reasoning", "i3", 1.0), ("other", "i4", 1.0)]
    out = scoring.mme_scores(rows)
    assert out["perception"] == 200.0 + 50.0 and out["cognition"] == 200.0 and out["total"] == 450.0
    assert out["score"] == 650.0  # every category, "other" included
    assert "perception" not in scoring.mme_scores([("shapes", "i1", 1.0)])  # not MME: no super-categories


def test_circular_accuracy():
    hits = {1: 1.0, 1_000_001: 1.0, 2_000_001: 0.0, 2: 1.0, 1_000_002: 1.0}
    assert scoring.circular_accuracy(hits) == (0.5, 2)


# ---- TSV reading and prompts ----
def write_tsv(path, rows: list[dict]):
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, columns, delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    return path


def test_read_base64_reference_list_and_paths(tmp_path):
    img = b64(png((30, 20)))
    (tmp_path / "pic.png").write_bytes(png((30, 20), (0, 0, 255)))
    rows = [
        {"index": 0, "image": img, "question": "q0", "A": "x", "B": "y", "C": "", "answer": "B", "category": "c1",
         "hint": "look"},
        {"index": 1, "image": "0", "question": "q1", "A": "x", "B": "y", "C": "z", "answer": "A", "category": "c2"},
        {"index": 2, "image": str([img, b64(png((30, 20), (0, 255, 0)))]), "question": "q2", "A": "x", "B": "y",
         "answer": "A"},
    ]
    bench = load_benchmark(write_tsv(tmp_path / "mc.tsv", rows))
    assert bench.name == "mc" and bench.kind == "mc"
    a, b, c = bench.items
    assert a.options == {"A": "x", "B": "y"} and a.hint == "look" and a.answer == "B" and a.category == "c1"
    assert b.options == {"A": "x", "B": "y", "C": "z"} and b.hint is None
    assert a.images[0].load() == png((30, 20)) and b.images[0].load() == png((30, 20))  # index-reference resolved
    assert a.image_key == b.image_key != c.image_key
    assert len(c.images) == 2 and c.images[1].load() == png((30, 20), (0, 255, 0))

    paths = [{"index": 5, "image_path": "pic.png", "question": "q", "answer": "yes"},
             {"index": 6, "image_path": str(["pic.png", "pic.png"]), "question": "q", "answer": "No"}]
    bench = load_benchmark(write_tsv(tmp_path / "yn.tsv", paths))
    assert bench.kind == "yesno"
    assert bench.items[0].images[0].load() == tmp_path / "pic.png" and len(bench.items[1].images) == 2


def test_read_text_only_missing_answer_and_reference_lists(tmp_path):
    rows = [{"index": 3, "question": "What is 1+1?"}, {"index": 4, "question": "Colour?"}]
    bench = load_benchmark(write_tsv(tmp_path / "test.tsv", rows))
    assert bench.kind == "vqa" and not bench.has_answers and bench.items[0].images == []
    rows = [{"index": 1, "question": "q", "answer": str(["two", "2", "two"])}]
    assert load_benchmark(write_tsv(tmp_path / "v.tsv", rows)).items[0].answers == ["two", "2", "two"]
    assert load_benchmark(tmp_path / "v.tsv", kind="anls").kind == "anls"


def test_read_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_benchmark(tmp_path / "nope.tsv")
    with pytest.raises(ValueError, match="question"):
        load_benchmark(write_tsv(tmp_path / "a.tsv", [{"index": 1, "answer": "x"}]))
    with pytest.raises(ValueError, match="duplicate index 1"):
        load_benchmark(write_tsv(tmp_path / "b.tsv", [{"index": 1, "question": "q"}, {"index": 1, "question": "r"}]))
    with pytest.raises(ValueError, match="unknown benchmark kind"):
        load_benchmark(tmp_path / "b.tsv", kind="essay")


def test_prompts_exact():
    item = Item(index=0, question="What colour?", options={"A": "red", "B": "blue"}, hint="A toy.")
    assert build_prompt(item, "mc") == ("A toy.\nWhat colour?\nA. red\nB. blue\n"
                                        "Answer with the option's letter from the given choices directly.")
    item.hint = None
    assert build_prompt(item, "mc") == f"What colour?\nA. red\nB. blue\n{MC_SUFFIX}"
    assert build_prompt(Item(0, "这是什么?", {"A": "猫"}), "mc") == "这是什么?\nA. 猫\n请直接回答选项字母。"
    assert build_prompt(Item(0, "Is it red?"), "yesno") == "Is it red?\nPlease answer yes or no." == \
        f"Is it red?\n{YESNO_SUFFIX}"
    assert build_prompt(Item(0, "Who?"), "vqa") == "Who?\nAnswer the question using a single word or phrase."
    assert build_prompt(Item(0, "Who?"), "anls") == f"Who?\n{VQA_SUFFIX}"


def test_rotation():
    item = Item(index=7, question="q", options={"A": "w", "B": "x", "C": "y", "D": "z"}, answers=["C"])
    r1 = rotate(item, 1)
    assert r1.index == 1_000_007 and r1.options == {"A": "x", "B": "y", "C": "z", "D": "w"} and r1.answer == "B"
    r3 = rotate(item, 3)
    assert r3.options == {"A": "z", "B": "w", "C": "x", "D": "y"} and r3.answer == "D"
    copies = circular_items([item])
    assert [c.index for c in copies] == [7, 1_000_007, 2_000_007, 3_000_007]
    assert all(c.options[c.answer] == "y" for c in copies)
    assert circular_items(copies) == copies  # a file that already holds copies is not rotated again


# ---- end to end ----
@pytest.fixture(scope="module")
def model_and_tokenizer(random_ckpt, random_loaded):
    return random_ckpt, *random_loaded


def _mc_rows():
    img = b64(png((30, 20)))
    return [
        {"index": 0, "image": img, "question": "item-0 colour?", "A": "red", "B": "blue", "answer": "A",
         "category": "colour"},
        {"index": 1, "image": "0", "question": "item-1 shape?", "A": "square", "B": "circle", "C": "star",
         "answer": "C", "category": "shape"},
        {"index": 2, "image": str([img, b64(png((40, 90), (9, 9, 9)))]), "question": "item-2 same?",
         "A": "yes", "B": "no", "answer": "B", "category": "shape"},
        {"index": 3, "image": "not base64!" * 9, "question": "item-3 broken?", "A": "p", "B": "q", "answer": "A",
         "category": "colour"},
        {"index": 4, "image": "77", "question": "item-4 dangling?", "A": "p", "B": "q", "answer": "A",
         "category": "colour"},
    ]


def _fake_generate(tokenizer, answer_for):
    """A stand-in for generation: answers each prompt with answer_for(decoded prompt), then <|im_end|>."""
    def fake(model, ids, pixel_values=None, **kwargs):
        outs = [tokenizer.encode(answer_for(tokenizer.decode(r.tolist())), add_bos=False)
                + [tokenizer.stop_token_ids[-1]] for r in ids]
        width = max(map(len, outs))
        return torch.tensor([o + [tokenizer.pad_id] * (width - len(o)) for o in outs])
    return fake


def test_end_to_end_random_model_writes_outputs(model_and_tokenizer, tmp_path):
    _, model, tokenizer = model_and_tokenizer
    tsv = write_tsv(tmp_path / "tiny_mc.tsv", _mc_rows())
    res = run.evaluate(model, tokenizer, tsv, out_dir=tmp_path / "out", batch_size=2, max_tiles=2,
                       max_new_tokens=3, progress=False)
    assert res["counts"] == {"rows": 5, "questions": 5, "scored": 5, "bad_rows": 2, "no_answer": 0, "judged": 0}
    assert set(res["categories"]) == {"colour", "shape"} and res["categories"]["shape"]["n"] == 2
    preds = [json.loads(line) for line in (tmp_path / "out/tiny_mc.predictions.jsonl").read_text().splitlines()]
    assert [p["index"] for p in preds] == [0, 1, 2, 3, 4]
    assert "base64" in preds[3]["error"] and "index '77'" in preds[4]["error"]
    assert preds[3]["hit"] == preds[4]["hit"] == 0.0 and preds[3]["prediction"] == ""
    assert json.loads((tmp_path / "out/tiny_mc.results.json").read_text()) == res
    md = (tmp_path / "out/tiny_mc.results.md").read_text()
    assert "| category | n | accuracy (%) |" in md and "| colour | 3 |" in md


def test_fake_model_right_scores_100_wrong_scores_0(model_and_tokenizer, tmp_path, monkeypatch):
    _, model, tokenizer = model_and_tokenizer
    rows = _mc_rows()[:3]
    tsv = write_tsv(tmp_path / "mc.tsv", rows)
    truth = {f"item-{r['index']}": (r["answer"], r[r["answer"]]) for r in rows}

    def key(prompt):
        return next(k for k in truth if k in prompt)
    monkeypatch.setattr(run, "generate", _fake_generate(tokenizer, lambda p: f"{truth[key(p)][0]}"))
    assert run.evaluate(model, tokenizer, tsv, progress=False)["overall"]["score"] == 1.0
    monkeypatch.setattr(run, "generate", _fake_generate(tokenizer, lambda p: truth[key(p)][1]))  # option text
    assert run.evaluate(model, tokenizer, tsv, progress=False)["overall"]["score"] == 1.0
    monkeypatch.setattr(run, "generate", _fake_generate(tokenizer, lambda p: "I cannot tell"))
    res = run.evaluate(model, tokenizer, tsv, progress=False)
    assert res["overall"]["score"] == 0.0 and all(c["score"] == 0.0 for c in res["categories"].values())


def test_circular_right_only_for_some_rotations(model_and_tokenizer, tmp_path, monkeypatch):
    _, model, tokenizer = model_and_tokenizer
    rows = [{"index": i, "question": f"item-{i} pick", "A": "cat", "B": "dog", "C": "cow", "answer": "B"}
            for i in range(2)]
    tsv = write_tsv(tmp_path / "text_mc.tsv", rows)  # text-only

    def answer(prompt):  # item-0: always says the right text; item-1: always says "B" (right only unrotated)
        return "dog" if "item-0" in prompt else "B"
    monkeypatch.setattr(run, "generate", _fake_generate(tokenizer, answer))
    res = run.evaluate(model, tokenizer, tsv, circular=True, out_dir=tmp_path, progress=False)
    assert res["circular"] and res["counts"]["rows"] == 6 and res["counts"]["questions"] == 2
    assert res["overall"]["score"] == 0.5 and res["overall"]["vanilla"] == 1.0
    assert "vanilla" in (tmp_path / "text_mc.results.md").read_text()


def test_vqa_yesno_and_test_split(model_and_tokenizer, tmp_path, monkeypatch):
    _, model, tokenizer = model_and_tokenizer
    img = b64(png((30, 20)))
    yn = [{"index": 0, "image": img, "question": "item-0 red?", "answer": "Yes", "category": "c"},
          {"index": 1, "image": "0", "question": "item-1 blue?", "answer": "No", "category": "c"}]
    monkeypatch.setattr(run, "generate", _fake_generate(tokenizer, lambda p: "Yes"))
    res = run.evaluate(model, tokenizer, write_tsv(tmp_path / "yn.tsv", yn), progress=False)
    assert res["kind"] == "yesno" and res["overall"]["score"] == 0.5 and res["overall"]["acc_plus"] == 0.0
    assert res["overall"]["mme_score"] == 50.0
    vqa = [{"index": 0, "question": "item-0 how many?", "answer": str(["two"] * 3 + ["three"] * 7)}]
    monkeypatch.setattr(run, "generate", _fake_generate(tokenizer, lambda p: "2"))
    assert run.evaluate(model, tokenizer, write_tsv(tmp_path / "v.tsv", vqa), progress=False)["overall"][
        "score"] == pytest.approx(0.9)
    res = run.evaluate(model, tokenizer, write_tsv(tmp_path / "t.tsv", [{"index": 9, "question": "q"}]),
                       out_dir=tmp_path, progress=False)
    assert res["overall"]["score"] is None and res["counts"]["no_answer"] == 1
    assert json.loads((tmp_path / "t.predictions.jsonl").read_text())["prediction"] == "2"


def test_cli_eval(model_and_tokenizer, tmp_path, capsys):
    path, _, _ = model_and_tokenizer
    tsv = write_tsv(tmp_path / "cli.tsv", _mc_rows()[:2])
    rc = main(["eval", "--model", str(path), "--bench", str(tsv), "--out", str(tmp_path / "o"),
               "--max-new-tokens", "2", "--max-tiles", "1", "--limit", "1"])
    assert rc == 0 and "| **overall** | 1 |" in capsys.readouterr().out
    assert json.loads((tmp_path / "o/cli.results.json").read_text())["counts"]["rows"] == 1


def test_a_failing_row_does_not_stop_the_run(model_and_tokenizer, tmp_path, monkeypatch):
    _, model, tokenizer = model_and_tokenizer
    rows = [{"index": i, "question": f"item-{i} say", "answer": "ok"} for i in range(4)]
    ok = _fake_generate(tokenizer, lambda p: "ok")

    def flaky(model, ids, pixel_values=None, **kwargs):  # fails on any batch holding item-2
        if any("item-2" in tokenizer.decode(r.tolist()) for r in ids):
            raise RuntimeError("out of memory")
        return ok(model, ids, pixel_values, **kwargs)
    monkeypatch.setattr(run, "generate", flaky)
    res = run.evaluate(model, tokenizer, write_tsv(tmp_path / "f.tsv", rows), batch_size=4, out_dir=tmp_path,
                       progress=False)
    assert res["overall"]["score"] == 0.75 and res["counts"]["bad_rows"] == 1
    preds = [json.loads(x) for x in (tmp_path / "f.predictions.jsonl").read_text().splitlines()]
    assert [p["prediction"] for p in preds] == ["ok", "ok", "", "ok"] and "out of memory" in preds[2]["error"]


def test_tiny_model_reports_tile_as_its_config_says(model_and_tokenizer, tmp_path, monkeypatch):
    """The reports (`reproduce.evaluate_tsv`: demo, --reproduce) tile each picture up to the model's own
    max_dynamic_patch, so a model trained on one tile per picture is evaluated on one."""
    from monovl import reproduce
    _, model, tokenizer = model_and_tokenizer
    seen = []
    monkeypatch.setattr(reproduce, "evaluate", lambda *a, **kw: seen.append(kw["max_tiles"]))
    old = model.cfg.max_dynamic_patch
    try:
        for n in (1, 3):
            model.cfg.max_dynamic_patch = n
            reproduce.evaluate_tsv(model, tokenizer, tmp_path / "mc.tsv")
    finally:
        model.cfg.max_dynamic_patch = old
    assert seen == [1, 3]
