"""`monovl demo --reproduce` end to end at the small world scale with a few steps, then `monovl demo` on its model."""
import json
import re
from pathlib import Path

import pytest
import torch

import monovl
from monovl.config import preset
from monovl.checkpoint import SHIPPED_MODEL
from monovl.demo import demo
from monovl.reproduce import (WARMUP, SHIPPED_LLM, STAGES, prepare, reproduce, stage_config, text_logits,
                              visual_chance)


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    root = tmp_path_factory.mktemp("repro")
    # from scratch: every recipe trains (the default path copies the shipped stage-0 LLM instead: tested below)
    return root, reproduce(root, scale="small", steps_scale=0.01, eval_limit=4, progress=False, from_scratch=True)


def test_tiny_presets_share_one_llm():
    tiny, llm = preset("tiny"), preset("tiny-llm")
    assert tiny.num_image_token == 64 and tiny.vision.image_size == 112
    assert llm.vision is None and not llm.llm.visual_ffn_experts
    assert {k: v for k, v in vars(tiny.llm).items() if k != "visual_ffn_experts"} == \
        {k: v for k, v in vars(llm.llm).items() if k != "visual_ffn_experts"}


def test_stage_configs_chain_delta_and_full(tmp_path):
    s0, s11 = stage_config("s0_llm", tmp_path, "delta"), stage_config("s1_1", tmp_path, "full")
    warm = [stage_config(stem, tmp_path, "delta") for stem in WARMUP]  # stage 0's parts before s0_llm
    assert [w.model.path for w in warm] == [str(tmp_path / "runs/init")] + [f"{w.run.out_dir}/final" for w in warm[:-1]]
    assert s0.model.path == f"{warm[-1].run.out_dir}/final" and len({w.run.out_dir for w in warm}) == len(WARMUP)
    assert [s["kind"] for s in warm[0].data.sources] == ["text"] and warm[0].data.seq_len <= s0.data.seq_len
    assert s0.model.preset == "tiny-llm" and s0.data.sources[0]["kind"] == "text"
    assert s11.model.path == str(tmp_path / "runs/s0/final") and s11.model.stage == "full"
    delta = stage_config("s1_3", tmp_path, "delta", steps_scale=0.5)
    assert delta.model.stage == "s1.3++" and delta.model.path == str(tmp_path / "runs/delta/s1_2/final")
    assert delta.schedule.steps == round(stage_config("s1_3", tmp_path, "delta").schedule.steps * 0.5)
    assert all(Path(s["path"]).is_relative_to(tmp_path / "world") for s in delta.data.sources)


@pytest.mark.slow
def test_reproduce_trains_every_stage_and_keeps_text_logits_through_s1_3(reproduced):
    root, out = reproduced
    rows = {(r.chain, r.stage): r for r in out["results"]}
    assert set(rows) == {(c, s) for c in ("delta", "full") for s in STAGES}
    for stage in ("s1_1", "s1_2", "s1_3"):  # the LLM is frozen: bit-identical text logits; the ablation breaks them
        assert rows["delta", stage].text_logits_identical and rows["delta", stage].text_logits_max_diff == 0
        assert not rows["full", stage].text_logits_identical
        assert rows["delta", stage].scores["text_lm"] == rows["delta", "s0_llm"].scores["text_lm"]
    assert not rows["delta", "s2"].text_logits_identical  # S2 trains everything
    for r in out["results"]:
        assert 0 <= r.scores["text"] <= 1
        assert (r.visual is None) == (r.stage == "s0_llm")
    model, tokenizer = monovl.load(out["final"])
    s0, _ = monovl.load(root / "runs/s0/final")
    assert model.cfg.vision is not None and s0.cfg.vision is None
    assert model.cfg.max_dynamic_patch == preset("tiny").max_dynamic_patch  # monolithize keeps the preset's budget
    assert torch.equal(text_logits(monovl.load(root / "runs/delta/s1_3/final")[0], tokenizer, ["Hi"])[0],
                       text_logits(s0, tokenizer, ["Hi"])[0])
    assert set(rows["delta", "s0_llm"].reading) == {"mc", "yesno", "open"}  # stage 0 reads the captioned benchmarks
    assert all(0 <= v <= 1 for v in rows["delta", "s0_llm"].reading.values())
    assert not rows["delta", "s1_1"].reading
    report = (root / "report.md").read_text()
    assert "Reading reference" in report and "Full-tuning ablation" in report
    assert f"chance level {100 * visual_chance():.1f} %" in report
    assert (root / "visual.png").read_bytes()[:4] == b"\x89PNG" and (root / "text.png").stat().st_size > 1000
    assert len(json.loads((root / "results.json").read_text())) == 10


@pytest.mark.slow
def test_demo_streams_answers_and_writes_a_report(reproduced, tmp_path):
    _, out = reproduced
    pieces = []
    result = demo(out["final"], tmp_path / "demo", write=pieces.append, limit=4, examples=2)
    text = "".join(pieces)
    assert "| **overall** |" in text and text.count("Q: ") == 2
    assert set(result["scores"]) == {"mc", "yesno", "open", "text", "text_lm"}
    assert (tmp_path / "demo/categories.png").is_file() and "Example answers" in result["report"].read_text()
    assert re.search(r"clean drawings .*: [\d.]+ % of \d+ multiple-choice questions \(colour [\d.]+ %, count [\d.]+ %",
                     text)
    assert result["clean"][1:] in result["report"].read_text()  # the report capitalises it
    asked = {json.loads(line)["question"] for line in (tmp_path / "demo/eval/text.predictions.jsonl").open()}
    home = (tmp_path / "demo/world-seed0/bench/text.tsv").read_text()  # the facts of the world it trained on
    assert asked and all(q in home for q in asked)
    assert not all(q in (tmp_path / "demo/world/bench/text.tsv").read_text() for q in asked)


def test_demo_without_a_model_points_to_reproduce(tmp_path):
    with pytest.raises(FileNotFoundError, match="--reproduce"):
        demo(tmp_path / "missing", tmp_path / "out")


def test_shipped_model_is_small_and_in_release_format():
    assert sum(p.stat().st_size for p in SHIPPED_MODEL.iterdir()) <= 25 * 2**20
    model, tokenizer = monovl.load(SHIPPED_MODEL)
    assert model.cfg.vision.image_size == 112 and model.cfg.llm.visual_ffn_experts
    assert model.cfg.llm.visual_attention_experts and model.cfg.vision.hidden_size == preset("tiny").vision.hidden_size
    # the tile budget its S1.3 and S2 trained with (S1.1 and S1.2, as the preset, one tile per picture)
    assert model.cfg.max_dynamic_patch == 3 and preset("tiny").max_dynamic_patch == 1
    assert model.cfg.image_token_id == tokenizer.img_context_id
    assert json.loads((SHIPPED_MODEL / "config.json").read_text())["architectures"] == ["InternVLChatModel"]


def test_shipped_llm_is_the_plain_stage_0_model_with_the_shipped_tokenizer():
    files = list(SHIPPED_LLM.iterdir()) + list(SHIPPED_MODEL.iterdir())
    assert sum(p.stat().st_size for p in files) <= 40 * 2**20
    llm, tokenizer = monovl.load(SHIPPED_LLM)
    assert llm.cfg.vision is None and not llm.cfg.llm.visual_ffn_experts
    assert (SHIPPED_LLM / "tokenizer.json").read_bytes() == (SHIPPED_MODEL / "tokenizer.json").read_bytes()
    assert {k: v for k, v in vars(llm.cfg.llm).items() if "visual" not in k and k != "vocab_size"} == \
        {k: v for k, v in vars(monovl.load(SHIPPED_MODEL)[0].cfg.llm).items() if "visual" not in k and k != "vocab_size"}


def test_reproduce_starts_from_the_shipped_llm(tmp_path):
    world = prepare(tmp_path, "small")
    assert (world / "bench/described/open.tsv").is_file() and not (tmp_path / "runs/init").exists()
    copied = tmp_path / "runs/s0/final"
    assert (copied / "model.safetensors").read_bytes() == (SHIPPED_LLM / "model.safetensors").read_bytes()
