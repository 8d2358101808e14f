"""Model-side training pieces: per-stage freezing, the frozen-LLM invariant, LoRA, monolithize."""
import json

import pytest
import torch
import torch.nn.functional as F

import monovl
from monovl.config import VisionConfig, preset
from monovl.scratch import new_model
from monovl.tokenizer import INTERNVL_TOKENS, Tokenizer, build_bpe_tokenizer
from monovl.train.freeze import STAGES, adamw, freeze, param_groups, trainable_names
from monovl.train.lora import LoRALinear, apply_lora, merge_lora
from monovl.train.monolithize import monolithize
from tokenizer_fixture import corpus, make_sp_tokenizer_dir

IMG_START, IMG_END, IMG_CONTEXT = 497, 498, 499  # ids in the 512-token debug vocabulary


def _model(attention_experts=False, seed=0):
    cfg = preset("debug", visual_attention_experts=attention_experts)
    cfg.image_token_id = IMG_CONTEXT
    return new_model(cfg, seed)


def _expected(stage, attention_experts):
    """The trainable names of a 2-layer debug model, written out by hand."""
    vision = ["vision_model.embeddings.class_embedding", "vision_model.embeddings.patch_embedding.weight",
              "vision_model.embeddings.patch_embedding.bias", "vision_model.embeddings.position_embedding"]
    vision += [f"mlp1.{i}.{w}" for i in (0, 1, 3) for w in ("weight", "bias")]
    layers = [f"language_model.model.layers.{i}." for i in range(2)]
    experts = [f"{p}feed_forward_ve.{w}.weight" for p in layers for w in ("w1", "w2", "w3")]
    if attention_experts:
        experts += [f"{p}attention_ve.{w}.weight" for p in layers for w in ("wqkv", "wo")]
    attention = [f"{p}attention.{w}.weight" for p in layers for w in ("wqkv", "wo")]
    return {"s1.1": set(vision + experts), "s1.2": set(vision + experts),
            "s1.3": set(vision + experts + attention), "s1.3++": set(vision + experts)}[stage]


@pytest.mark.parametrize("attention_experts", [False, True], ids=["v1", "v1.5"])
def test_exact_trainable_set_per_stage(attention_experts):
    model = _model(attention_experts)
    every = {n for n, _ in model.named_parameters()}
    for stage in ("s1.1", "s1.2", "s1.3"):
        freeze(model, stage)
        assert set(trainable_names(model)) == _expected(stage, attention_experts), stage
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        assert frozen == every - _expected(stage, attention_experts)
    if attention_experts:  # EViP++ alignment learning: the text weights stay frozen
        assert set(trainable_names(freeze(model, "s1.3++"))) == _expected("s1.3++", True)
    else:
        with pytest.raises(ValueError, match="attention experts"):
            freeze(model, "s1.3++")
    for stage in ("s2", "full"):
        assert set(trainable_names(freeze(model, stage))) == every
    assert set(STAGES) == {"s1.1", "s1.2", "s1.3", "s1.3++", "s2", "full"}


def test_freeze_logs_counts(caplog):
    model = _model()
    with caplog.at_level("INFO", logger="monovl.train.freeze"):
        freeze(model, "s1.1")
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert f"trainable {n_train} parameters" in caplog.text and f"frozen {n_frozen} " in caplog.text


def test_freeze_errors_and_custom_patterns():
    model = _model()
    with pytest.raises(ValueError, match="unknown stage"):
        freeze(model, "s9")
    with pytest.raises(ValueError, match=r"\*\.nothing\.\*.*match no parameter"):
        freeze(model, ["mlp1.*", "*.nothing.*"])
    assert trainable_names(freeze(model, ["mlp1.1.*"])) == ["mlp1.1.weight", "mlp1.1.bias"]


def _image_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, 400, (2, 6), generator=g)
    ids = torch.cat([torch.full((2, 1), 1), torch.full((2, 1), IMG_START), torch.full((2, 4), IMG_CONTEXT),
                     torch.full((2, 1), IMG_END), text], dim=1)  # (2, 13): 4 tokens per 56² tile
    return ids, torch.randn(2, 3, 56, 56, generator=g)


def _loss(model, ids, pixel_values):
    logits = model(ids, pixel_values)[:, :-1]  # (B, T-1, V)
    target = ids[:, 1:].masked_fill(ids[:, 1:] == IMG_CONTEXT, -100)  # loss on text tokens only
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)


def _train(model, steps=3, lr=1e-2):
    opt = torch.optim.AdamW(param_groups(model, weight_decay=0.1), lr=lr)
    model.train()
    for step in range(steps):
        opt.zero_grad()
        _loss(model, *_image_batch(step)).backward()
        opt.step()
    return opt


def test_param_groups_and_optimizer_state_only_for_trainable():
    model = freeze(_model(attention_experts=True), "s1.1")
    groups = param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert no_decay == {"vision_model.embeddings.class_embedding", "vision_model.embeddings.patch_embedding.bias",
                        "vision_model.embeddings.position_embedding", "mlp1.0.weight", "mlp1.0.bias",
                        "mlp1.1.bias", "mlp1.3.bias"}
    opt = adamw(groups, lr=1e-3)
    assert opt.defaults["fused"]
    _loss(model, *_image_batch()).backward()
    opt.step()
    unused = {"vision_model.embeddings.class_embedding"}  # stored in the checkpoint, never used: no gradient
    assert {names[id(p)] for p in opt.state} == _expected("s1.1", True) - unused
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert {n for n, p in model.named_parameters() if p.grad is not None} == _expected("s1.1", True) - unused
    full = param_groups(freeze(model, "full"), 0.1)
    full_no_decay = {names[id(p)] for p in full[1]["params"]}
    assert "language_model.model.tok_embeddings.weight" in full_no_decay
    assert "language_model.model.layers.0.ffn_norm.weight" in full_no_decay
    assert "language_model.output.weight" not in full_no_decay


def test_fused_adamw_steps_like_the_per_tensor_loop():
    """The trainer's fused AdamW gives the per-tensor implementation's weights to fp32 rounding (weight decay groups,
    frozen parameters, several steps)."""
    weights = []
    for implementation in ("fused", "loop"):
        torch.manual_seed(0)
        model = freeze(_model(attention_experts=True), "s1.3++")
        groups = param_groups(model, weight_decay=0.1)
        opt = adamw(groups, lr=1e-2) if implementation == "fused" else torch.optim.AdamW(groups, lr=1e-2,
                                                                                          foreach=False)
        assert bool(opt.defaults["fused"]) == (implementation == "fused")
        for _ in range(3):
            opt.zero_grad()
            _loss(model, *_image_batch()).backward()
            opt.step()
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    start = torch.cat([p.detach().flatten() for p in _model(attention_experts=True).parameters()])
    assert (weights[0] - start).abs().max() > 1e-3  # the steps moved the weights …
    assert (weights[0] - weights[1]).abs().max() < 1e-6  # … the same way


@pytest.mark.parametrize("attention_experts", [False, True], ids=["v1", "v1.5"])
def test_frozen_llm_keeps_text_logits_bit_identical(attention_experts):
    model = freeze(_model(attention_experts), "s1.1")
    text = torch.tensor([[1, 17, 42, 99, 250, 7, 3]])
    image = _image_batch(seed=9)
    with torch.no_grad():
        text_before, image_before = model(text), model(*image)
    _train(model)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(text), text_before)
        assert not torch.allclose(model(*image)[:, 6:], image_before[:, 6:], atol=1e-4)  # text after the image


def test_full_tuning_changes_text_logits():
    model = freeze(_model(), "full")
    text = torch.tensor([[1, 17, 42, 99, 250, 7, 3]])
    with torch.no_grad():
        before = model(text)
    _train(model)
    with torch.no_grad():
        assert not torch.allclose(model(text), before, atol=1e-4)


def test_lora_starts_unchanged_trains_and_merges_to_release_keys():
    model = freeze(_model(attention_experts=True), "s1.1").double()
    release_keys = list(model.state_dict())
    text, (ids, pv) = torch.tensor([[1, 17, 42, 99, 250]]), _image_batch(seed=5)
    pv = pv.double()
    with torch.no_grad():
        before_text, before_image = model(text), model(ids, pv)
    apply_lora(model, ["*.attention.wqkv", "*.feed_forward_ve.*", "*.attention_ve.wo"], rank=4, alpha=8)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 2 * (1 + 3 + 1)
    assert not model.get_submodule("language_model.model.layers.0.attention.wqkv").weight.requires_grad
    with torch.no_grad():
        assert torch.equal(model(text), before_text) and torch.equal(model(ids, pv), before_image)
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-2)
    _loss(model, ids, pv).backward()
    opt.step()
    ve = model.get_submodule("language_model.model.layers.1.feed_forward_ve.w2")
    assert ve.lora_B.abs().sum() > 0  # the visual expert's LoRA got gradients through the routing
    with torch.no_grad():
        lora_text, lora_image = model(text), model(ids, pv)
        assert not torch.allclose(lora_text, before_text, atol=1e-6)
        merge_lora(model)
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        assert list(model.state_dict()) == release_keys
        torch.testing.assert_close(model(text), lora_text, rtol=0, atol=1e-10)
        torch.testing.assert_close(model(ids, pv), lora_image, rtol=0, atol=1e-10)


def test_lora_rejects_unknown_targets():
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        apply_lora(_model(), ["*.attention.nope"])


def _strip_internvl_tokens(path):
    """Remove the InternVL tokens from a tokenizer folder, as a plain InternLM2 LLM ships it."""
    (path / "added_tokens.json").write_text("{}")
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {k: v for k, v in config["added_tokens_decoder"].items()
                                      if v["content"] not in INTERNVL_TOKENS}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    if (path / "tokenizer.json").exists():
        tj = json.loads((path / "tokenizer.json").read_text())
        tj["added_tokens"] = [t for t in tj["added_tokens"] if t["content"] not in INTERNVL_TOKENS]
        (path / "tokenizer.json").write_text(json.dumps(tj))


@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizer.json"])
def test_monolithize_round_trip(tmp_path, kind):
    llm_dir = tmp_path / "llm"
    if kind == "sentencepiece":
        make_sp_tokenizer_dir(llm_dir, vocab_size=384)
    else:
        build_bpe_tokenizer(corpus(), 320, llm_dir)
    _strip_internvl_tokens(llm_dir)
    llm_tok = Tokenizer.from_dir(llm_dir)
    assert llm_tok.token_to_id("<IMG_CONTEXT>") is None
    # A vocabulary that is a multiple of 64, as InternLM2's 92544: the BLAS kernel of the output head then
    # computes the old columns identically with the 9 new rows appended (a ragged tail may round differently).
    assert llm_tok.vocab_size % 64 == 0
    cfg = preset("debug", vocab_size=llm_tok.vocab_size, visual_ffn_experts=False)
    cfg.vision = None
    monovl.save_model(new_model(cfg, seed=3), llm_dir, tokenizer=llm_tok)
    llm = monovl.load_model(llm_dir)

    model, tok = monolithize(llm, llm_tok, vision=VisionConfig(image_size=56, patch_size=14, hidden_size=32),
                             visual_attention_experts=True, out_tokenizer_dir=tmp_path / "tok")
    v = llm_tok.vocab_size
    assert [tok.token_to_id(t) for t in INTERNVL_TOKENS] == list(range(v, v + 9))
    assert model.cfg.image_token_id == tok.img_context_id == v + 2 and model.cfg.llm.vocab_size == v + 9
    assert Tokenizer.from_dir(tmp_path / "tok").img_context_id == v + 2
    p, src = dict(model.named_parameters()), dict(llm.named_parameters())
    emb = p["language_model.model.tok_embeddings.weight"]
    torch.testing.assert_close(emb[v:], src["language_model.model.tok_embeddings.weight"].mean(0).expand(9, -1))
    layer = "language_model.model.layers.1."
    assert torch.equal(p[layer + "feed_forward_ve.w2.weight"], src[layer + "feed_forward.w2.weight"])
    assert torch.equal(p[layer + "attention_ve.wqkv.weight"], src[layer + "attention.wqkv.weight"])

    text = torch.tensor([llm_tok.encode("two cats and a dog")])
    with torch.no_grad():
        assert torch.equal(model(text)[..., :v], llm(text))
    out = tmp_path / "mono"
    monovl.save_model(model, out, tokenizer=tok)
    loaded, loaded_tok = monovl.load(out)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["InternVLChatModel"]
    assert loaded.cfg.llm.visual_attention_experts and loaded_tok.img_context_id == v + 2
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, model.state_dict()[name]), name
    prompt = "<img>" + "<IMG_CONTEXT>" * model.cfg.num_image_token + "</img>\nwhat is this?"
    ids = torch.tensor([loaded_tok.encode(prompt)])
    assert int((ids == v + 2).sum()) == 4
    with torch.no_grad():
        logits = loaded(ids, torch.randn(1, 3, 56, 56))
    assert logits.shape == (1, ids.shape[1], v + 9) and torch.isfinite(logits).all()


def test_monolithize_rejects_a_vision_model():
    with pytest.raises(ValueError, match="text-only LLM"):
        monolithize(_model(), None)


def test_monolithize_random_experts_leave_the_text_path_alone(tmp_path):
    llm_dir = tmp_path / "llm"
    build_bpe_tokenizer(corpus(), 320, llm_dir)
    _strip_internvl_tokens(llm_dir)
    llm_tok = Tokenizer.from_dir(llm_dir)
    cfg = preset("debug", vocab_size=llm_tok.vocab_size, visual_ffn_experts=False)
    cfg.vision = None
    monovl.save_model(new_model(cfg, seed=3), llm_dir, tokenizer=llm_tok)
    llm = monovl.load_model(llm_dir)
    vision = VisionConfig(image_size=56, patch_size=14, hidden_size=32)
    model, _ = monolithize(llm, llm_tok, vision=vision, visual_attention_experts=True, expert_init="random")
    p, src = dict(model.named_parameters()), dict(llm.named_parameters())
    layer = "language_model.model.layers.1."
    for expert, text in (("feed_forward_ve.w2.weight", "feed_forward.w2.weight"),
                         ("attention_ve.wqkv.weight", "attention.wqkv.weight")):
        assert not torch.equal(p[layer + expert], src[layer + text])
        assert p[layer + expert].std().item() == pytest.approx(0.02, rel=0.2)
    assert torch.equal(p[layer + "feed_forward.w2.weight"], src[layer + "feed_forward.w2.weight"])
    text = torch.tensor([llm_tok.encode("two cats and a dog")])
    with torch.no_grad():
        assert torch.equal(model(text)[..., :llm_tok.vocab_size], llm(text))
    with pytest.raises(ValueError, match="expert_init"):
        monolithize(llm, llm_tok, vision=vision, expert_init="zeros")
