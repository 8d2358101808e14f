"""A Qwen2 LLM through every EViP stage with the shipped tiny recipes: S1.1 → S1.2 → S1.3 → S2, then chat."""
import json
from pathlib import Path

import pytest
import torch

import monovl
from family_fixture import CHATML_TEMPLATE
from monovl.chat_template import encode_messages
from monovl.cli import main
from monovl.config import TOKENIZER_TEMPLATE
from monovl.tokenizer import build_bpe_tokenizer
from monovl.train.loop import train
from monovl.train.recipe import load_recipe
from monovl.world import generate_world, world_texts

transformers = pytest.importorskip("transformers")
RECIPES = Path(__file__).resolve().parent.parent / "src" / "monovl" / "recipes" / "tiny" / "evip"


def qwen_llm(path, vocab_size: int):
    """A random tiny Qwen2 (tied embeddings, q/k/v biases) written by `transformers`, with a ChatML tokenizer."""
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    tokenizer_config.update(chat_template=CHATML_TEMPLATE, add_bos_token=False, eos_token="<|im_end|>")
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))


def text_logits(path, question="What is two plus three?"):
    model, tokenizer = monovl.load(path)
    ids = encode_messages(model.cfg.template, tokenizer, [{"role": "user", "content": question}])
    with torch.no_grad():
        return model(torch.tensor(ids)[None])


@pytest.mark.slow
def test_every_stage_from_a_qwen2_llm(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    generate_world("data/world", scale="small")
    llm = Path("runs/tiny/evip/llm")
    tokenizer = build_bpe_tokenizer(world_texts("data/world"), vocab_size=512, out_dir=llm)
    qwen_llm(llm, tokenizer.vocab_size)
    llm_logits = text_logits(llm)

    overrides = ["schedule.steps=3", "schedule.warmup_steps=1", "checkpoint.every=0", "run.progress=false",
                 "run.tensorboard=false"]
    for stage in ("s1_1", "s1_2", "s1_3", "s2"):
        result = train(load_recipe(RECIPES / f"{stage}.toml", overrides))
        assert result["step"] == 3 and all(torch.isfinite(torch.tensor(result["losses"])))
        final = Path(result["final"])
        config = json.loads((final / "config.json").read_text())
        assert config["llm_config"]["architectures"] == ["Qwen2ForCausalLM"]
        assert config["template"] == TOKENIZER_TEMPLATE
        if stage != "s2":  # the LLM is frozen (EViP++): text-only logits stay bit-identical
            assert torch.equal(text_logits(final), llm_logits)
    assert not torch.equal(text_logits(final), llm_logits)  # S2 trains the LLM

    image = next(Path("data/world/images/train").glob("*.png"))
    capsys.readouterr()
    assert main(["chat", "--model", str(final), "--image", str(image), "--prompt", "What colour is the circle?",
                 "--max-new-tokens", "4"]) == 0
    assert "error" not in capsys.readouterr().err
