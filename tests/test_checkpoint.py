"""Checkpoint round trip, sharding, and every load error."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from monovl.checkpoint import INDEX, CheckpointError, load_model, save_model
from test_model import IMG, make_model, prompt


def load(path, **kw):
    return load_model(path, image_token_id=IMG, **kw)


@pytest.fixture
def saved(tmp_path):
    model = make_model()
    save_model(model, tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_round_trip_is_exact_and_keeps_unknown_fields(saved, tmp_path):
    model, path = saved
    cfg = json.loads((path / "config.json").read_text())
    cfg["some_future_field"] = {"kept": True}
    cfg["llm_config"]["another_unknown"] = 7
    (path / "config.json").write_text(json.dumps(cfg))
    loaded = load(path)
    assert_same_weights(model, loaded)
    save_model(loaded, tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["some_future_field"] == {"kept": True} and again["llm_config"]["another_unknown"] == 7
    assert_same_weights(loaded, load(tmp_path / "again"))
    ids = prompt(6, [1])[None]
    pv = torch.randn(1, 3, 56, 56)
    assert torch.equal(model(ids, pv), loaded(ids, pv))


def test_sharded_round_trip(saved, tmp_path):
    model, _ = saved
    save_model(model, tmp_path / "sharded", max_shard_bytes=200_000)
    index = json.loads((tmp_path / "sharded" / INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    total = sum(t.numel() * t.element_size() for f in files for t in load_file(tmp_path / "sharded" / f).values())
    assert index["metadata"]["total_size"] == total
    assert_same_weights(model, load(tmp_path / "sharded"))


def test_bf16_storage_loads_as_requested_dtype(saved, tmp_path):
    model, _ = saved
    save_model(model, tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    fp32 = load(tmp_path / "bf16")
    bf16 = load(tmp_path / "bf16", dtype=torch.bfloat16)
    assert fp32.language_model.output.weight.dtype == torch.float32
    assert bf16.language_model.output.weight.dtype == torch.bfloat16
    assert torch.equal(fp32.language_model.output.weight, bf16.language_model.output.weight.float())
    assert torch.equal(bf16.language_model.output.weight, model.language_model.output.weight.bfloat16())


def test_plain_internlm2_checkpoint_loads_as_text_part(saved, tmp_path):
    model, _ = saved
    state = {k.removeprefix("language_model."): v.contiguous() for k, v in model.state_dict().items()
             if k.startswith("language_model.") and "_ve." not in k}
    llm_cfg = json.loads((saved[1] / "config.json").read_text())["llm_config"]
    llm_cfg["architectures"] = ["InternLM2ForCausalLM"]
    path = tmp_path / "llm"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(llm_cfg))
    save_file(state, str(path / "model.safetensors"))
    llm = load_model(path)
    assert llm.cfg.vision is None and not hasattr(llm, "mlp1")
    ids = prompt(8)[None]
    assert torch.equal(llm(ids), model(ids))
    save_model(llm, tmp_path / "llm2")
    assert set(load_file(tmp_path / "llm2" / "model.safetensors")) == set(state)


def break_file(path, edit):
    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, str(path / "model.safetensors"))


def test_missing_key(saved):
    _, path = saved
    break_file(path, lambda s: s.pop("language_model.model.layers.1.feed_forward_ve.w2.weight"))
    with pytest.raises(CheckpointError, match=r"missing key\(s\): language_model.model.layers.1.feed_forward_ve.w2"):
        load(path)


def test_unexpected_key(saved):
    _, path = saved
    break_file(path, lambda s: s.update({"language_model.model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\): language_model.model.layers.0.extra.weight"):
        load(path)


def test_wrong_shape(saved):
    _, path = saved
    break_file(path, lambda s: s.update({"mlp1.1.bias": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"mlp1.1.bias: shape \(3,\) in model.safetensors, expected \(64,\)"):
        load(path)


def test_missing_shard_file(saved, tmp_path):
    model, _ = saved
    save_model(model, tmp_path / "sharded", max_shard_bytes=200_000)
    second = sorted((tmp_path / "sharded").glob("model-00002-of-*.safetensors"))[0]
    second.unlink()
    with pytest.raises(CheckpointError, match=f"missing: {second.name}"):
        load(tmp_path / "sharded")


def test_unsupported_architecture_and_bad_config(saved):
    _, path = saved
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlavaForConditionalGeneration"]}))
    with pytest.raises(CheckpointError, match="unsupported architecture 'LlavaForConditionalGeneration'"):
        load(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load(path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        load(path)


def test_no_weights_and_corrupt_weights(saved):
    _, path = saved
    (path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        load(path)


def test_attention_expert_mismatch_both_ways(tmp_path):
    v15 = make_model(visual_attention_experts=True)
    save_model(v15, tmp_path / "v15")
    cfg = json.loads((tmp_path / "v15" / "config.json").read_text())
    cfg["llm_config"]["visual_attention_experts"] = False
    (tmp_path / "v15" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="carry attention experts .* set llm_config.visual_attention_experts to true"):
        load(tmp_path / "v15")
    v1 = make_model()
    save_model(v1, tmp_path / "v1")
    cfg = json.loads((tmp_path / "v1" / "config.json").read_text())
    cfg["llm_config"]["visual_attention_experts"] = True
    (tmp_path / "v1" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="enables visual_attention_experts .* no attention_ve"):
        load(tmp_path / "v1")
