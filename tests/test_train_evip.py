"""Every EViP stage with the shipped tiny recipes: a plain InternLM2 LLM → S1.1 → S1.2 → S1.3 → S2 → chat."""
from pathlib import Path

import pytest
import torch

import monovl
from monovl.checkpoint import save_model
from monovl.config import preset
from monovl.scratch import new_model
from monovl.template import build_query
from monovl.tokenizer import build_bpe_tokenizer
from monovl.train.loop import train
from monovl.train.recipe import load_recipe
from monovl.world import generate_world, world_texts

RECIPES = Path(__file__).resolve().parent.parent / "src" / "monovl" / "recipes" / "tiny" / "evip"


def text_logits(path, question="What is two plus three?"):
    model, tokenizer = monovl.load(path)
    ids = torch.tensor(tokenizer.encode(build_query(question, [])))[None]
    with torch.no_grad():
        return model(ids)


@pytest.mark.slow
def test_every_stage_from_a_plain_llm(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    generate_world("data/world", scale="small")
    tokenizer = build_bpe_tokenizer(world_texts("data/world"), vocab_size=512, out_dir="runs/tiny/evip/llm")
    cfg = preset("debug", vocab_size=tokenizer.vocab_size, visual_ffn_experts=False)
    cfg.vision = None  # stage 0: a plain InternLM2 LLM
    save_model(new_model(cfg, seed=1), "runs/tiny/evip/llm", tokenizer=tokenizer)
    llm_logits = text_logits("runs/tiny/evip/llm")

    overrides = ["schedule.steps=3", "schedule.warmup_steps=1", "checkpoint.every=0", "run.progress=false",
                 "run.tensorboard=false"]
    for stage in ("s1_1", "s1_2", "s1_3", "s2"):
        result = train(load_recipe(RECIPES / f"{stage}.toml", overrides))
        assert result["step"] == 3 and all(torch.isfinite(torch.tensor(result["losses"])))
        final = Path(result["final"])
        assert final.samefile(f"runs/tiny/evip/{stage}/final")  # where the next recipe's model.path points
        if stage != "s2":  # the LLM is frozen (EViP++: attention experts): text-only logits stay bit-identical
            assert torch.equal(text_logits(final), llm_logits)
    assert not torch.equal(text_logits(final), llm_logits)  # S2 trains the LLM

    model, tokenizer = monovl.load(final)
    assert model.cfg.vision is not None and model.cfg.image_token_id == tokenizer.img_context_id
    image = next(Path("data/world/images/train").glob("*.png"))
    answer, history = monovl.chat(model, tokenizer, "What colour is the circle?", images=[image], max_new_tokens=4)
    assert isinstance(answer, str) and history[0].num_tiles
