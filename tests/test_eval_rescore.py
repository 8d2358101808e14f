"""Re-scoring saved predictions without a model, the metric from the benchmark name, the stratified --limit and
the LLM judge (a fake OpenAI-compatible server and `monovl serve`, both on 127.0.0.1 only)."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openpyxl
import pytest

from monovl.cli import main
from monovl.eval.benchmarks import Item, kind_from_name, load_benchmark, sample_items
from monovl.eval.judge import Judge
from monovl.eval.predictions import read_predictions, rescore
from test_eval import write_tsv

# (kind, answer or references, prediction, hit written by hand from VLMEvalKit's rules)
TRICKY = [
    ("mc", "A", "The answer is A.", 1.0), ("mc", "A", "'A'", 0.0), ("mc", "B", "It is dark red", 0.0),
    ("mc", "C", "bluest", 1.0), ("mc", "A", "A cat sat on it", 0.0), ("mc", "B", "**B**", 1.0),
    ("yesno", "Yes", "**Yes**", 0.0), ("yesno", "Yes", "Yes: there is one", 0.0), ("yesno", "Yes", "Yes。", 0.0),
    ("yesno", "No", "Noël", 0.0), ("yesno", "Yes", "Yes, there is one", 1.0), ("yesno", "No", "no.", 1.0),
    ("vqa", str(["where's"] * 10), "wheres", 1.0), ("vqa", str(["i'm"] * 10), "im", 0.0),
    ("anls", "abxy", "abcd", 0.5), ("anls", "abc", "ab    ", 1 - 1 / 6),
    ("relaxed", "1000", "1,000", 0.0), ("relaxed", "0", "0.0", 0.0), ("relaxed", "100", "104", 1.0),
    ("ocrbench", str(["x^2"]), "\tx ^ 2", 1.0), ("exact", "Dog", " dog ", 1.0), ("exact", "dog", "a dog", 0.0),
]
OPTIONS = {"A": "red", "B": "dark red", "C": "blue", "D": "a green cat"}


def _bench(tmp_path, kind):
    rows = []
    for n, (k, answer, _, _) in enumerate(TRICKY):
        if k == kind:
            row = {"index": n, "question": f"q{n}", "answer": answer}
            if k == "mc":
                row.update(OPTIONS)
            if k == "ocrbench":
                row["category"] = "Handwritten Mathematical Expression Recognition"
            rows.append(row)
    return write_tsv(tmp_path / f"tricky_{kind}.tsv", rows)


@pytest.mark.parametrize("kind", sorted({t[0] for t in TRICKY}))
def test_tricky_answers_through_predictions(tmp_path, kind):
    tsv = _bench(tmp_path, kind)
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps({"index": n, "prediction": p}) + "\n"
                             for n, (k, _, p, _) in enumerate(TRICKY) if k == kind))
    assert main(["eval", "--bench", str(tsv), "--predictions", str(preds), "--out", str(tmp_path / "o"),
                 "--kind", kind]) == 0
    records = [json.loads(x) for x in (tmp_path / f"o/tricky_{kind}.predictions.jsonl").read_text().splitlines()]
    expected = {n: hit for n, (k, _, _, hit) in enumerate(TRICKY) if k == kind}
    assert {r["index"]: pytest.approx(r["hit"]) for r in records} == expected
    if kind in ("mc", "yesno"):
        assert all("extracted" in r for r in records)
    results = json.loads((tmp_path / f"o/tricky_{kind}.results.json").read_text())
    assert results["overall"]["score"] == pytest.approx(sum(expected.values()) / len(expected))


@pytest.mark.parametrize("name, kind", [
    ("MMBench_DEV_EN", "mc"), ("SEEDBench_IMG", "mc"), ("ScienceQA_TEST", "mc"), ("AI2D_TEST", "mc"),
    ("MMStar", "mc"), ("MME", "yesno"), ("MME-RealWorld", "mc"), ("POPE", "yesno"), ("HallusionBench", "yesno"),
    ("TextVQA_VAL", "vqa"), ("DocVQA_VAL", "anls"), ("InfoVQA_TEST", "anls"), ("ChartQA_TEST", "relaxed"),
    ("OCRBench", "ocrbench"), ("GQA_TestDev_Balanced", "exact"), ("OCRVQA_TESTCORE", "exact"),
    ("my_own", None),
])
def test_kind_from_name(name, kind):
    assert kind_from_name(name) == kind


def test_name_decides_the_metric_and_kind_overrides(tmp_path):
    rows = [{"index": 0, "question": "q", "answer": "hello"}]
    assert load_benchmark(write_tsv(tmp_path / "DocVQA_VAL.tsv", rows)).kind == "anls"
    assert load_benchmark(write_tsv(tmp_path / "ChartQA_TEST.tsv", rows)).kind == "relaxed"
    assert load_benchmark(write_tsv(tmp_path / "ChartQA_TEST.tsv", rows), "vqa").kind == "vqa"
    assert load_benchmark(write_tsv(tmp_path / "custom.tsv", rows)).kind == "vqa"  # columns decide


def test_limit_is_a_seeded_stratified_sample():
    items = [Item(index=i, question="q", category="big" if i < 80 else "small") for i in range(100)]
    items += [Item(index=i + 1_000_000, question="q", category="big" if i < 80 else "small") for i in range(100)]
    picked = sample_items(items, 10, seed=1)
    groups = {i.group for i in picked}
    assert len(groups) == 10 and len(picked) == 20  # copies stay with their question
    assert sum(g < 80 for g in groups) == 8  # 80 % big, 20 % small
    assert picked == sample_items(items, 10, seed=1) and groups != {i.group for i in sample_items(items, 10, seed=2)}
    assert groups != set(range(8)) | {80, 81}  # not the first rows


def test_vlmevalkit_xlsx_and_tsv_predictions_and_circular(tmp_path):
    rows = [{"index": i, "question": f"q{i}", "A": "cat", "B": "dog", "answer": "B"} for i in range(2)]
    tsv = write_tsv(tmp_path / "MMBench_X.tsv", rows)
    # VLMEvalKit numbers rotation k as index + k * 1e6; question 0 right in both rotations, question 1 in one
    preds = {0: "B", 1_000_000: "A", 1: "dog", 1_000_001: "B"}
    book = openpyxl.Workbook()
    book.active.append(["index", "question", "prediction"])
    for i, p in preds.items():
        book.active.append([i, "q", p])
    book.save(tmp_path / "X_model.xlsx")
    write_tsv(tmp_path / "X_model.tsv", [{"index": i, "prediction": p} for i, p in preds.items()])
    for pred_file in ("X_model.xlsx", "X_model.tsv"):
        assert read_predictions(tmp_path / pred_file) == preds
        res = rescore(tsv, tmp_path / pred_file, out_dir=tmp_path / "o")
        assert res["circular"] and res["overall"]["score"] == 0.5 and res["counts"]["rows"] == 4


def test_rows_without_prediction_are_bad_rows(tmp_path):
    tsv = write_tsv(tmp_path / "v.tsv", [{"index": i, "question": "q", "answer": "x"} for i in range(3)])
    (tmp_path / "p.jsonl").write_text(json.dumps({"index": 0, "prediction": "x"}) + "\n")
    res = rescore(tsv, tmp_path / "p.jsonl")
    assert res["overall"]["score"] == pytest.approx(1 / 3) and res["counts"]["bad_rows"] == 2


def test_eval_without_model_or_predictions_is_an_error(tmp_path, capsys):
    tsv = write_tsv(tmp_path / "v.tsv", [{"index": 0, "question": "q", "answer": "x"}])
    assert main(["eval", "--bench", str(tsv)]) == 2
    assert "error: give --model (to run a checkpoint) or --predictions" in capsys.readouterr().err


class _FakeJudge(BaseHTTPRequestHandler):
    """Answers like an OpenAI chat endpoint: 'B' when the answer mentions a puppy, 'Yes' for 'certainly'."""
    seen: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        _FakeJudge.seen.append((prompt, self.headers.get("Authorization")))
        answer = prompt.rsplit("Answer: ", 1)[1]
        reply = "B" if "puppy" in answer else "Yes" if "certainly" in answer else "I cannot say"
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_judge_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _FakeJudge.seen = []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_judge_maps_free_answers_and_caches(tmp_path, fake_judge_url):
    rows = [{"index": i, "question": f"q{i}", "A": "cat", "B": "dog", "answer": "B"} for i in range(3)]
    tsv = write_tsv(tmp_path / "mc.tsv", rows)
    preds = ["a small puppy", "B", "a bird"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"index": i, "prediction": p}) + "\n"
                                              for i, p in enumerate(preds)))
    args = ["eval", "--bench", str(tsv), "--predictions", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o"),
            "--judge-url", fake_judge_url, "--judge-model", "fake", "--judge-key", "sekrit-42"]
    assert main(args) == 0
    res = json.loads((tmp_path / "o/mc.results.json").read_text())
    assert res["overall"]["score"] == pytest.approx(2 / 3) and res["counts"]["judged"] == 2
    assert "sekrit" not in json.dumps(res) and _FakeJudge.seen[0][1] == "Bearer sekrit-42"
    assert len(_FakeJudge.seen) == 1 + 3  # "a bird": three attempts, no readable reply
    assert "A. cat\nB. dog" in _FakeJudge.seen[0][0] and "Answer: a small puppy" in _FakeJudge.seen[0][0]
    assert main(args) == 0 and len(_FakeJudge.seen) == 4  # cached per row: no new requests
    no_judge = rescore(tsv, tmp_path / "p.jsonl")
    assert no_judge["overall"]["score"] == pytest.approx(1 / 3) and no_judge["counts"]["judged"] == 0


def test_judge_yes_no(tmp_path, fake_judge_url):
    item = Item(index=0, question="Is it red?", answers=["Yes"])
    judge = Judge(fake_judge_url, "fake")
    assert judge.extract(item, "yesno", "certainly, it is") == "yes"
    assert judge.extract(item, "yesno", "hmm") is None and len(_FakeJudge.seen) == 1 + 5
    assert Judge("http://127.0.0.1:9/v1", "x", timeout=2).extract(item, "yesno", "hmm") is None  # refused: None


def test_judge_against_monovl_serve(tmp_path, random_loaded):
    from test_serve import Server

    server = Server(*random_loaded, dict(max_batch=2, max_len=1024))
    try:
        rows = [{"index": 0, "question": "q", "A": "cat", "B": "dog", "answer": "B"}]
        tsv = write_tsv(tmp_path / "mc.tsv", rows)
        (tmp_path / "p.jsonl").write_text(json.dumps({"index": 0, "prediction": "a puppy"}) + "\n")
        judge = Judge(server.url + "/v1", "tiny", cache=tmp_path / "cache.jsonl")
        res = rescore(tsv, tmp_path / "p.jsonl", judge=judge)
        assert res["counts"]["judged"] == 1
        cached = [json.loads(x) for x in (tmp_path / "cache.jsonl").read_text().splitlines()]
        assert len(cached) == 1 and isinstance(cached[0]["reply"], str)  # the server answered (random text)
    finally:
        server.stop()
