"""Sanity checks of the spec checkpoint writer and the float64 reference themselves (tiny, seconds)."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

try:
    from spec_checkpoint import INTERNVL_ADDED_TOKENS, write_spec_checkpoint
    from reference import pixel_shuffle_reference, reference_logits, reference_vision_features, rope_cos_sin
except ModuleNotFoundError:  # tests/ imported as a package
    from tests.spec_checkpoint import INTERNVL_ADDED_TOKENS, write_spec_checkpoint
    from tests.reference import (pixel_shuffle_reference, reference_logits, reference_vision_features,
                                 rope_cos_sin)


def expected_shapes(layers=2, d=64, heads=4, kv_heads=2, inter=96, vocab=128, c=32, p=14, s=56,
                    attention_experts=False):
    hd, c4 = d // heads, 4 * c
    shapes = {
        "vision_model.embeddings.class_embedding": (1, 1, c),
        "vision_model.embeddings.patch_embedding.weight": (c, 3, p, p),
        "vision_model.embeddings.patch_embedding.bias": (c,),
        "vision_model.embeddings.position_embedding": (1, 1 + (s // p) ** 2, c),
        "mlp1.0.weight": (c4,), "mlp1.0.bias": (c4,),
        "mlp1.1.weight": (d, c4), "mlp1.1.bias": (d,),
        "mlp1.3.weight": (d, d), "mlp1.3.bias": (d,),
        "language_model.model.tok_embeddings.weight": (vocab, d),
        "language_model.model.norm.weight": (d,),
        "language_model.output.weight": (vocab, d),
    }
    attn = ["attention"] + (["attention_ve"] if attention_experts else [])
    for i in range(layers):
        pre = f"language_model.model.layers.{i}."
        for name in attn:
            shapes[pre + name + ".wqkv.weight"] = (kv_heads * (heads // kv_heads + 2) * hd, d)
            shapes[pre + name + ".wo.weight"] = (d, heads * hd)
        shapes[pre + "attention_norm.weight"] = (d,)
        shapes[pre + "ffn_norm.weight"] = (d,)
        for ffn in ("feed_forward", "feed_forward_ve"):
            shapes[pre + ffn + ".w1.weight"] = (inter, d)
            shapes[pre + ffn + ".w2.weight"] = (d, inter)
            shapes[pre + ffn + ".w3.weight"] = (inter, d)
    return shapes


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_spec_checkpoint(tmp_path_factory.mktemp("plain"))


@pytest.fixture(scope="module")
def ckpt_ve(tmp_path_factory):
    return write_spec_checkpoint(tmp_path_factory.mktemp("attn_ve"), visual_attention_experts=True)


def image_prompt(info, n_tiles=1, seed=0, text_before=3, text_after=4):
    """(1, T) ids `<s> text <img> <IMG_CONTEXT>*k </img> text` and matching (n_tiles, 3, S, S) pixels."""
    gen = torch.Generator().manual_seed(seed)
    vocab = info["config"]["llm_config"]["vocab_size"]
    tok = info["added_tokens"]
    s = info["config"]["force_image_size"]

    def text(n):
        return torch.randint(3, vocab - len(INTERNVL_ADDED_TOKENS), (n,), generator=gen)

    ids = torch.cat([
        torch.tensor([1]), text(text_before), torch.tensor([tok["<img>"]]),
        torch.full((info["num_image_token"] * n_tiles,), info["image_token_id"]),
        torch.tensor([tok["</img>"]]), text(text_after),
    ])[None]
    return ids, torch.randn(n_tiles, 3, s, s, generator=gen)


def text_prompt(info, t_len=10, seed=1):
    gen = torch.Generator().manual_seed(seed)
    vocab = info["config"]["llm_config"]["vocab_size"]
    return torch.randint(3, vocab - len(INTERNVL_ADDED_TOKENS), (2, t_len), generator=gen)


def perturbed(state_dict, pattern, scale=0.5, seed=3):
    gen = torch.Generator().manual_seed(seed)
    out = dict(state_dict)
    hits = [k for k in out if pattern in k]
    assert hits, pattern
    for k in hits:
        out[k] = out[k] + scale * torch.randn(out[k].shape, generator=gen)
    return out


# ---- the writer ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("experts", [False, True])
def test_keys_and_shapes_exactly_as_spec(tmp_path, experts):
    info = write_spec_checkpoint(tmp_path, visual_attention_experts=experts)
    files = {p.name for p in tmp_path.iterdir()}
    assert files == {"config.json", "generation_config.json", "model.safetensors", "added_tokens.json"}
    on_disk = load_file(str(tmp_path / "model.safetensors"))
    want = expected_shapes(attention_experts=experts)
    assert {k: tuple(t.shape) for k, t in on_disk.items()} == want
    assert all(t.dtype == torch.bfloat16 for t in on_disk.values())
    assert {k: tuple(t.shape) for k, t in info["state_dict"].items()} == want
    for k, t in on_disk.items():
        assert info["state_dict"][k].dtype == torch.float32
        assert torch.equal(info["state_dict"][k], t.float()), k


def test_config_and_token_files(tmp_path):
    info = write_spec_checkpoint(tmp_path, rope_scaling={"type": "linear", "factor": 2.0},
                                 extra_config={"llm_config": {"max_position_embeddings": 64}, "new_field": 5})
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg == info["config"]
    assert cfg["architectures"] == ["InternVLChatModel"] and cfg["model_type"] == "internvl_chat"
    assert (cfg["force_image_size"], cfg["downsample_ratio"], cfg["ps_version"]) == (56, 0.5, "v2")
    assert (cfg["select_layer"], cfg["template"]) == (-1, "internlm2-chat")
    vc, lc = cfg["vision_config"], cfg["llm_config"]
    assert vc["model_type"] == "intern_vit_patch" and vc["architectures"] == ["InternVisionPatchModel"]
    assert (vc["patch_size"], vc["image_size"], vc["hidden_size"], vc["num_channels"]) == (14, 56, 32, 3)
    assert lc["architectures"] == ["InternLM2VEForCausalLM"] and lc["model_type"] == "internlm2"
    assert lc["rope_scaling"] == {"type": "linear", "factor": 2.0} and lc["max_position_embeddings"] == 64
    assert "visual_attention_experts" not in lc
    assert "monovl_spec_extra" in cfg and "monovl_spec_llm_extra" in lc and "monovl_spec_vision_extra" in vc
    assert cfg["new_field"] == 5
    added = json.loads((tmp_path / "added_tokens.json").read_text())
    assert added == {tok: 128 - 9 + i for i, tok in enumerate(INTERNVL_ADDED_TOKENS)}
    assert info["image_token_id"] == added["<IMG_CONTEXT>"] == 121
    assert info["num_image_token"] == 4
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == 2


def test_visual_attention_experts_flag_and_shared_weights(tmp_path):
    plain = write_spec_checkpoint(tmp_path / "a")
    ve = write_spec_checkpoint(tmp_path / "b", visual_attention_experts=True)
    assert ve["config"]["llm_config"]["visual_attention_experts"] is True
    for k, t in plain["state_dict"].items():  # same seed: every shared weight is identical
        assert torch.equal(ve["state_dict"][k], t), k
    pre = "language_model.model.layers.0."
    assert not torch.equal(ve["state_dict"][pre + "attention_ve.wqkv.weight"],
                           ve["state_dict"][pre + "attention.wqkv.weight"])
    assert not torch.equal(plain["state_dict"][pre + "feed_forward_ve.w1.weight"],
                           plain["state_dict"][pre + "feed_forward.w1.weight"])


def test_sharded_index_consistent(tmp_path):
    info = write_spec_checkpoint(tmp_path, shard_bytes=40_000, visual_attention_experts=True)
    assert not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    n = len(shards)
    assert n > 2
    assert shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    seen = {}
    for name in shards:
        for key, t in load_file(str(tmp_path / name)).items():
            assert key not in seen, f"{key} in two shards"
            seen[key] = (name, t)
    assert set(seen) == set(index["weight_map"]) == set(info["state_dict"])
    assert all(index["weight_map"][k] == name for k, (name, _) in seen.items())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for _, t in seen.values())
    assert all(torch.equal(info["state_dict"][k], t.float()) for k, (_, t) in seen.items())


def test_tokenizer_dir_sets_vocab_and_image_id(tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    added = {"<|im_end|>": 200, "<|im_start|>": 201}
    added.update({t: 202 + i for i, t in enumerate(INTERNVL_ADDED_TOKENS)})
    (tok / "added_tokens.json").write_text(json.dumps(added))
    (tok / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
        "2": {"content": "</s>", "special": True}}}))
    (tok / "special_tokens_map.json").write_text("{}")
    info = write_spec_checkpoint(tmp_path / "ckpt", tokenizer_dir=tok)
    assert info["config"]["llm_config"]["vocab_size"] == 211
    assert info["image_token_id"] == 204
    assert json.loads((tmp_path / "ckpt" / "added_tokens.json").read_text()) == added
    assert (tmp_path / "ckpt" / "tokenizer_config.json").exists()
    assert info["state_dict"]["language_model.output.weight"].shape == (211, 64)


# ---- the reference ------------------------------------------------------------------------------------


def spec_pixel_shuffle(x, version):
    """§2's recipe on an (N, h, w, C) grid, as view/permute."""
    n, h, w, c = x.shape
    x = x.reshape(n, h, w // 2, 2 * c).permute(0, 2, 1, 3)  # (N, w/2, h, 2C)
    x = x.reshape(n, w // 2, h // 2, 4 * c)
    return x if version == "v1" else x.permute(0, 2, 1, 3)  # (N, h/2, w/2, 4C)


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("hw", [(4, 4), (4, 6)])
def test_pixel_shuffle_matches_spec_recipe(version, hw):
    grid = torch.randn(2, *hw, 3, dtype=torch.float64)
    want = spec_pixel_shuffle(grid, version)
    got = torch.stack([pixel_shuffle_reference(g, 0.5, version) for g in grid])
    assert torch.equal(got, want)


def test_vision_features_match_builtin_modules(ckpt):
    sd = {k: t.double() for k, t in ckpt["state_dict"].items()}
    cfg = ckpt["config"]
    for size in (56, 84):  # native grid (table used as is) and a resized one (bicubic)
        pv = torch.randn(3, 3, size, size, dtype=torch.float64)
        got = reference_vision_features(sd, cfg, pv)
        g = size // 14
        assert got.shape == (3, (g // 2) ** 2, 64)
        x = F.conv2d(pv, sd["vision_model.embeddings.patch_embedding.weight"],
                     sd["vision_model.embeddings.patch_embedding.bias"], stride=14)  # (N, C, g, g)
        table = sd["vision_model.embeddings.position_embedding"][0, 1:].T.reshape(1, 32, 4, 4)
        x = x + F.interpolate(table, size=(g, g), mode="bicubic", align_corners=False)
        x = spec_pixel_shuffle(x.permute(0, 2, 3, 1), "v2").reshape(3, -1, 128)
        x = F.layer_norm(x, (128,), sd["mlp1.0.weight"], sd["mlp1.0.bias"], eps=1e-5)
        x = F.linear(F.gelu(F.linear(x, sd["mlp1.1.weight"], sd["mlp1.1.bias"])), sd["mlp1.3.weight"],
                     sd["mlp1.3.bias"])
        torch.testing.assert_close(got, x, rtol=1e-12, atol=1e-12)
        assert got.abs().max() < 20 and got.std() > 0.1  # activations in a sane range


def builtin_logits(sd, cfg, ids, pv, image_token_id):
    """A second, vectorised float64 implementation using torch built-ins (no attention experts)."""
    lc = cfg["llm_config"]
    d, heads, kv = lc["hidden_size"], lc["num_attention_heads"], lc["num_key_value_heads"]
    hd, n_rep, eps = d // heads, heads // kv, lc["rms_norm_eps"]
    b, t = ids.shape
    visual = (ids == image_token_id)[..., None]  # (B, T, 1)
    x = sd["language_model.model.tok_embeddings.weight"][ids].clone()  # (B, T, D)
    if pv is not None:
        x[visual[..., 0]] = reference_vision_features(sd, cfg, pv).reshape(-1, d)
    cos, sin = rope_cos_sin(lc, t)

    def rope(z):  # (B, H, T, hd)
        return z * cos + torch.cat([-z[..., hd // 2:], z[..., :hd // 2]], -1) * sin

    def ffn(z, pre):
        return F.linear(F.silu(F.linear(z, sd[pre + ".w1.weight"])) * F.linear(z, sd[pre + ".w3.weight"]),
                        sd[pre + ".w2.weight"])

    for i in range(lc["num_hidden_layers"]):
        pre = f"language_model.model.layers.{i}"
        h = F.rms_norm(x, (d,), sd[pre + ".attention_norm.weight"], eps)
        qkv = F.linear(h, sd[pre + ".attention.wqkv.weight"]).reshape(b, t, kv, n_rep + 2, hd)
        q = qkv[:, :, :, :n_rep].reshape(b, t, heads, hd).transpose(1, 2)  # (B, H, T, hd)
        k, v = qkv[:, :, :, -2].transpose(1, 2), qkv[:, :, :, -1].transpose(1, 2)  # (B, KV, T, hd)
        o = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True, enable_gqa=True)
        x = x + F.linear(o.transpose(1, 2).reshape(b, t, d), sd[pre + ".attention.wo.weight"])
        h = F.rms_norm(x, (d,), sd[pre + ".ffn_norm.weight"], eps)
        x = x + torch.where(visual, ffn(h, pre + ".feed_forward_ve"), ffn(h, pre + ".feed_forward"))
    x = F.rms_norm(x, (d,), sd["language_model.model.norm.weight"], eps)
    return F.linear(x, sd["language_model.output.weight"])


def test_reference_matches_builtin_implementation(ckpt):
    sd = {k: t.double() for k, t in ckpt["state_dict"].items()}
    ids, pv = image_prompt(ckpt, n_tiles=2)
    pv = pv.double()
    ref = reference_logits(sd, ckpt["config"], ids, pv, image_token_id=ckpt["image_token_id"])
    assert ref.dtype == torch.float64 and ref.shape == (1, ids.shape[1], 128)
    torch.testing.assert_close(ref, builtin_logits(sd, ckpt["config"], ids, pv, ckpt["image_token_id"]),
                               rtol=1e-10, atol=1e-10)
    assert 0.3 < ref.std() < 30  # logits in a sane range
    text = text_prompt(ckpt)
    torch.testing.assert_close(
        reference_logits(sd, ckpt["config"], text, image_token_id=ckpt["image_token_id"]),
        builtin_logits(sd, ckpt["config"], text, None, ckpt["image_token_id"]), rtol=1e-10, atol=1e-10)


def test_reference_is_causal(ckpt):
    ids, pv = image_prompt(ckpt)
    ref = reference_logits(ckpt["state_dict"], ckpt["config"], ids, pv, image_token_id=ckpt["image_token_id"])
    ids2 = ids.clone()
    ids2[0, -2] = (ids2[0, -2] + 1) % 100 + 3
    ref2 = reference_logits(ckpt["state_dict"], ckpt["config"], ids2, pv, image_token_id=ckpt["image_token_id"])
    torch.testing.assert_close(ref2[:, :-2], ref[:, :-2], rtol=0, atol=1e-12)
    assert (ref2[:, -2:] - ref[:, -2:]).abs().max() > 1e-3


def test_text_logits_ignore_visual_experts(ckpt_ve):
    sd, cfg = ckpt_ve["state_dict"], ckpt_ve["config"]
    ids = text_prompt(ckpt_ve)
    ref = reference_logits(sd, cfg, ids, image_token_id=ckpt_ve["image_token_id"])
    changed = perturbed(perturbed(sd, "feed_forward_ve"), "attention_ve")
    torch.testing.assert_close(reference_logits(changed, cfg, ids, image_token_id=ckpt_ve["image_token_id"]),
                               ref, rtol=0, atol=0)


def test_image_logits_use_visual_ffn(ckpt):
    sd, cfg, img = ckpt["state_dict"], ckpt["config"], ckpt["image_token_id"]
    ids, pv = image_prompt(ckpt)
    first_img = int((ids[0] == img).nonzero()[0])
    ref = reference_logits(sd, cfg, ids, pv, image_token_id=img)
    other = reference_logits(perturbed(sd, "feed_forward_ve"), cfg, ids, pv, image_token_id=img)
    torch.testing.assert_close(other[:, :first_img], ref[:, :first_img], rtol=0, atol=0)
    assert (other[:, first_img:] - ref[:, first_img:]).abs().max() > 1e-2
    text_ffn = reference_logits(perturbed(sd, "feed_forward.w"), cfg, ids, pv, image_token_id=img)
    assert (text_ffn[:, :first_img] - ref[:, :first_img]).abs().max() > 1e-2


def test_attention_experts_route_by_modality(ckpt_ve):
    sd, cfg, img = ckpt_ve["state_dict"], ckpt_ve["config"], ckpt_ve["image_token_id"]
    ids, pv = image_prompt(ckpt_ve)
    first_img = int((ids[0] == img).nonzero()[0])
    ref = reference_logits(sd, cfg, ids, pv, image_token_id=img)
    other = reference_logits(perturbed(sd, "attention_ve"), cfg, ids, pv, image_token_id=img)
    torch.testing.assert_close(other[:, :first_img], ref[:, :first_img], rtol=0, atol=0)
    assert (other[:, first_img:] - ref[:, first_img:]).abs().max() > 1e-2
    # attention experts equal to the text attention == no attention experts
    same = dict(sd)
    for k in sd:
        if ".attention_ve." in k:
            same[k] = sd[k.replace(".attention_ve.", ".attention.")]
    cfg_off = copy.deepcopy(cfg)
    cfg_off["llm_config"]["visual_attention_experts"] = False
    torch.testing.assert_close(reference_logits(same, cfg, ids, pv, image_token_id=img),
                               reference_logits(sd, cfg_off, ids, pv, image_token_id=img), rtol=0, atol=1e-12)


def test_rope_scaling(ckpt):
    lc = dict(ckpt["config"]["llm_config"], max_position_embeddings=16)
    none = rope_cos_sin(dict(lc, rope_scaling=None), 40)
    lin1 = rope_cos_sin(dict(lc, rope_scaling={"type": "linear", "factor": 1.0}), 40)
    torch.testing.assert_close(lin1, none, rtol=0, atol=0)
    lin2 = rope_cos_sin(dict(lc, rope_scaling={"type": "linear", "factor": 2.0}), 40)
    torch.testing.assert_close(lin2[0][::2], none[0][:20], rtol=0, atol=1e-12)
    dyn = {"type": "dynamic", "factor": 2.0}
    torch.testing.assert_close(rope_cos_sin(dict(lc, rope_scaling=dyn), 16), rope_cos_sin(lc, 16),
                               rtol=0, atol=0)  # T <= max_position_embeddings: unscaled
    assert (rope_cos_sin(dict(lc, rope_scaling=dyn), 17)[0] - rope_cos_sin(lc, 17)[0]).abs().max() > 1e-6
    # closed forms: hd = 16, theta = 1e6; cos[t, j] = cos[t, j + hd/2] = cos(t * base ** (-2j / hd))
    t = torch.arange(40, dtype=torch.float64)
    for j in (0, 1, 5):
        for (cos, sin), base, pos in [(none, 1e6, t), (lin2, 1e6, t / 2),
                                      (rope_cos_sin(dict(lc, rope_scaling=dyn), 40),
                                       1e6 * (2.0 * 40 / 16 - 1.0) ** (16 / 14), t)]:
            angle = pos * base ** (-2 * j / 16)
            torch.testing.assert_close(cos[:, j], torch.cos(angle), rtol=0, atol=1e-12)
            torch.testing.assert_close(cos[:, j + 8], torch.cos(angle), rtol=0, atol=1e-12)
            torch.testing.assert_close(sin[:, j + 8], torch.sin(angle), rtol=0, atol=1e-12)
    sd, cfg = ckpt["state_dict"], ckpt["config"]
    ids = text_prompt(ckpt)
    cfg_lin1 = copy.deepcopy(cfg)
    cfg_lin1["llm_config"]["rope_scaling"] = {"type": "linear", "factor": 1.0}
    torch.testing.assert_close(reference_logits(sd, cfg_lin1, ids), reference_logits(sd, cfg, ids),
                               rtol=0, atol=0)
