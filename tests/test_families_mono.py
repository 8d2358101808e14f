"""Qwen2, Qwen3 and Llama 3 LLMs made monolithic: release layout, exact text-only logits, delta tuning, chat."""
import json

import pytest
import torch

import monovl
from family_fixture import write_family_tokenizer
from monovl.checkpoint import load_model
from monovl.cli import main
from monovl.inputs import build_inputs
from monovl.train.freeze import freeze, trainable_names
from pictures import RED, b64, data_url, png
from test_families import build_reference

pytest.importorskip("transformers")

FAMILIES = {  # case of test_families → (tokenizer kind, architecture, monovl family)
    "qwen2-tied": ("qwen", "Qwen2ForCausalLM", "qwen2"), "qwen3-head-dim": ("qwen", "Qwen3ForCausalLM", "qwen3"),
    "llama3-rope-scaling": ("llama3", "LlamaForCausalLM", "llama")}
VOCAB = 264  # the LLM's rows; its tokenizer has 260 tokens (a byte-level BPE needs 256 + specials)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(case, LLM folder, monolithic folder written by `monovl monolithize`)."""
    case, kind = request.param, FAMILIES[request.param][0]
    root = tmp_path_factory.mktemp(case)
    build_reference(case, root / "llm", vocab_size=VOCAB)
    write_family_tokenizer(root / "llm", kind, vocab_size=260)  # InternVL tokens: some inside the rows, some new
    assert main(["monolithize", str(root / "llm"), str(root / "mono"), "--vision", "debug"]) == 0
    return case, root / "llm", root / "mono"


def _text_ids(seed=0):
    return torch.randint(3, 200, (2, 40), generator=torch.Generator().manual_seed(seed))


def test_release_layout_names_the_llm_family(family):
    case, _, mono = family
    config = json.loads((mono / "config.json").read_text())
    assert config["architectures"] == ["InternVLChatModel"]
    assert config["llm_config"]["architectures"] == [FAMILIES[case][1]]
    assert config["template"] == "tokenizer" and config["vision_config"]["model_type"] == "intern_vit_patch"
    model, tokenizer = monovl.load(mono, dtype=torch.float32)
    names = [n for n, _ in model.named_parameters()]
    assert "language_model.model.layers.0.mlp_ve.gate_proj.weight" in names
    assert not any(".feed_forward" in n or ".wqkv" in n for n in names)
    assert model.cfg.llm.vocab_size == tokenizer.vocab_size > VOCAB  # the InternVL tokens, some in new rows
    assert tokenizer.img_context_id == model.cfg.image_token_id


def test_text_only_logits_equal_the_llm_bit_for_bit(family):
    _, llm_dir, mono = family
    llm, llm_tokenizer = monovl.load(llm_dir, dtype=torch.float32)
    model, tokenizer = monovl.load(mono, dtype=torch.float32)
    with torch.no_grad():
        want, got = llm(_text_ids()), model(_text_ids())
    n = llm_tokenizer.vocab_size  # the LLM's tokens; its spare rows past them may now hold InternVL tokens
    assert n < VOCAB and torch.equal(got[..., :n], want[..., :n])
    rows = model.language_model.embed_tokens.weight
    mean = llm.language_model.embed_tokens.weight[:n].mean(0)
    for token in ("<img>", "<IMG_CONTEXT>", "</box>"):  # new tokens: mean-initialised, inside the rows or past
        assert torch.allclose(rows[tokenizer.token_to_id(token)], mean, rtol=0, atol=1e-7)


def test_delta_tuned_stage_keeps_text_logits_and_trains_only_visual_parts(family):
    case, _, mono = family
    model, tokenizer = monovl.load(mono, dtype=torch.float32)
    with torch.no_grad():
        before = model(_text_ids(1))
    freeze(model, "s1.1")
    trained = trainable_names(model)
    assert trained and all(n.startswith(("vision_model.", "mlp1.")) or ".mlp_ve." in n for n in trained)
    assert sum(".mlp_ve." in n for n in trained) == 3 * model.cfg.llm.num_hidden_layers
    inputs = build_inputs(model, tokenizer, "What colour is the circle?", [_image()])
    ids = inputs.input_ids[None]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss = torch.nn.functional.cross_entropy(model(ids, inputs.pixel_values)[0, :-1], ids[0, 1:])
    loss.backward()
    opt.step()
    with torch.no_grad():
        after, image_logits = model(_text_ids(1)), model(ids, inputs.pixel_values)
    assert torch.equal(after, before)
    assert torch.isfinite(image_logits).all()


def test_image_prompt_uses_the_familys_template(family):
    case, _, mono = family
    model, tokenizer = monovl.load(mono, dtype=torch.float32)
    inputs = build_inputs(model, tokenizer, "What colour is the circle?", [_image()])
    text = tokenizer.decode(inputs.input_ids.tolist(), skip_special_tokens=False)
    header = "<|start_header_id|>user<|end_header_id|>\n\n" if FAMILIES[case][0] == "llama3" else "<|im_start|>user\n"
    block = "<img>" + "<IMG_CONTEXT>" * (model.cfg.num_image_token * inputs.pixel_values.shape[0]) + "</img>"
    assert header + block + "\nWhat colour is the circle?" in text
    answer, _ = monovl.chat(model, tokenizer, "What is it?", [_image()], max_new_tokens=4)
    assert isinstance(answer, str)


def test_attention_experts_use_the_familys_projections(family, tmp_path):
    case, llm_dir, mono = family
    out = tmp_path / "ve"
    assert main(["monolithize", str(llm_dir), str(out), "--vision", "debug", "--attention-experts"]) == 0
    with_ve, tokenizer = monovl.load(out, dtype=torch.float32)
    plain = load_model(mono, dtype=torch.float32)
    names = [n for n, _ in with_ve.named_parameters()]
    assert "language_model.model.layers.1.self_attn_ve.q_proj.weight" in names
    assert ("language_model.model.layers.1.self_attn_ve.q_norm.weight" in names) == case.startswith("qwen3")
    inputs = build_inputs(with_ve, tokenizer, "Describe.", [_image()])
    ids = inputs.input_ids[None]
    with torch.no_grad():  # experts start as copies of the text weights: the same numbers as without them
        want = plain(ids, inputs.pixel_values)
        torch.testing.assert_close(with_ve(ids, inputs.pixel_values), want, rtol=0, atol=1e-5)
        sparse, dense = with_ve(ids, inputs.pixel_values), with_ve(ids, inputs.pixel_values, dense=True)
    torch.testing.assert_close(sparse, dense, rtol=0, atol=1e-5)
    freeze(with_ve, "s1.3++")
    assert any(".self_attn_ve." in n for n in trainable_names(with_ve))
    assert not any(".self_attn." in n for n in trainable_names(with_ve))


def _image():
    from PIL import Image

    return Image.new("RGB", (60, 40), RED)


def test_info_eval_and_serve_take_the_result(family, tmp_path, capsys):
    from monovl.serve.prompts import build_prompt
    from monovl.serve.protocol import ChatRequest, ServeConfig

    case, _, mono = family
    assert main(["info", "--model", str(mono)]) == 0
    assert f"LLM family {FAMILIES[case][2]})" in capsys.readouterr().out
    image = b64(png())  # `_image()` as PNG
    tsv = tmp_path / "yn.tsv"
    tsv.write_text("index\timage\tquestion\tanswer\n0\t" + image + "\tIs it red?\tYes\n1\t0\tIs it blue?\tNo\n")
    assert main(["eval", "--model", str(mono), "--bench", str(tsv), "--out", str(tmp_path / "out"),
                 "--kind", "yesno", "--max-new-tokens", "3"]) == 0
    assert (tmp_path / "out").is_dir() and any((tmp_path / "out").rglob("*.json*"))
    model, tokenizer = monovl.load(mono, dtype=torch.float32)
    content = [{"type": "text", "text": "What is it?"},
               {"type": "image_url", "image_url": {"url": data_url(png())}}]
    body = ChatRequest(model="m", messages=[{"role": "user", "content": content}])
    ids, pixels = build_prompt(body, model, tokenizer, ServeConfig(model_name="m"))
    want = build_inputs(model, tokenizer, "What is it?", [_image()])
    assert ids.tolist() == want.input_ids.tolist() and torch.equal(pixels, want.pixel_values)


def test_served_over_http(family):
    import openai

    from test_serve import Server

    _, _, mono = family
    model, tokenizer = monovl.load(mono, dtype=torch.float32)
    server = Server(model, tokenizer, dict(max_batch=2, max_len=512), max_tiles=2)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        parts = [{"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": data_url(png())}}]
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": parts}], max_tokens=3,
                                           temperature=0)
    finally:
        server.stop()
    want = build_inputs(model, tokenizer, "What is it?", [png()], max_tiles=2)
    assert r.usage.prompt_tokens == len(want.input_ids) and r.usage.completion_tokens <= 3
