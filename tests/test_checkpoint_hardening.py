"""Damaged checkpoints: a config that is not an object or holds impossible sizes, non-float or non-finite weights,
a config of another depth, a missing tokenizer; `monovl info` checks every tensor's header and exits 2 when
one is wrong. Each gets one message that names the file and the field or tensor."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from monovl.checkpoint import CheckpointError, check_weights, load_model
from monovl.cli import main

HEAD = "language_model.model.layers.0.attention.wqkv.weight"


@pytest.fixture
def ckpt(random_ckpt, tmp_path):
    """A private copy of the random debug checkpoint, to damage."""
    return shutil.copytree(random_ckpt, tmp_path / "ckpt")


def edit_config(path, edit):
    cfg = json.loads((path / "config.json").read_text())
    cfg = edit(cfg) or cfg
    (path / "config.json").write_text(json.dumps(cfg))


def edit_weights(path, edit):
    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, str(path / "model.safetensors"))


def cli_error(capsys, *argv) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.startswith("error: "), err
    return err


@pytest.mark.parametrize("edit,words", [
    (lambda c: [c], "config.json: the file must be a JSON object ({...}), not list"),
    (lambda c: c["llm_config"].update(num_attention_heads=0), "llm_config.num_attention_heads = 0: must be an integer"),
    (lambda c: c["llm_config"].update(hidden_size="64"), "llm_config.hidden_size = '64'"),
    (lambda c: c["llm_config"].update(num_key_value_heads=3), "not a multiple of llm_config.num_key_value_heads = 3"),
    (lambda c: c.update(llm_config=[1]), "llm_config must be a JSON object"),
    (lambda c: c["vision_config"].update(patch_size=-14), "vision_config.patch_size = -14"),
    (lambda c: c.update(downsample_ratio=0.3), "downsample_ratio = 0.3"),
    (lambda c: c.update(architectures="InternVLChatModel"), "architectures = 'InternVLChatModel': must be a list"),
])
def test_bad_config_fields_are_named(ckpt, capsys, edit, words):
    edit_config(ckpt, edit)
    with pytest.raises(CheckpointError, match="config.json") as e:
        load_model(ckpt)
    assert words in str(e.value)
    assert words in cli_error(capsys, "info", "--model", str(ckpt))


def test_a_broken_generation_config_names_its_file(ckpt):
    (ckpt / "generation_config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="generation_config.json is not valid JSON"):
        load_model(ckpt)


def test_integer_weights_are_refused_by_name(ckpt, capsys):
    edit_weights(ckpt, lambda s: s.update({HEAD: s[HEAD].to(torch.int8)}))
    with pytest.raises(CheckpointError, match=rf"not floating-point weights .*{HEAD} \(I8\)"):
        load_model(ckpt)
    assert f"{HEAD} (I8)" in cli_error(capsys, "info", "--model", str(ckpt))


def test_nan_weights_are_refused_and_fp16_overflow_is_named(ckpt):
    state = load_file(ckpt / "model.safetensors")
    big = state[HEAD].clone()
    big[0, 0] = 1e6  # finite in float32, inf in float16
    edit_weights(ckpt, lambda s: s.update({HEAD: big}))
    assert load_model(ckpt, dtype=torch.float32).language_model.model.layers[0].attention.wqkv.weight[0, 0] == 1e6
    with pytest.raises(CheckpointError, match=rf"overflow float16 .*{HEAD} — load them as bfloat16"):
        load_model(ckpt, dtype=torch.float16)
    nan = state[HEAD].clone()
    nan[1, 2] = float("nan")
    edit_weights(ckpt, lambda s: s.update({HEAD: nan}))
    with pytest.raises(CheckpointError, match=rf"NaN or inf values in 1 tensor\(s\): {HEAD} — the checkpoint is"):
        load_model(ckpt)


def test_a_layer_count_mismatch_says_so_not_attention_experts(ckpt):
    edit_config(ckpt, lambda c: c["llm_config"].update(num_hidden_layers=1, visual_attention_experts=True))
    with pytest.raises(CheckpointError) as e:
        load_model(ckpt)
    text = str(e.value)
    assert "hold 2 decoder layers but llm_config.num_hidden_layers is 1" in text
    assert "attention_ve" not in text.split(" — ")[1]


def test_a_missing_tokenizer_is_explained_for_the_cli_user(ckpt, capsys):
    (ckpt / "tokenizer.json").unlink()
    err = cli_error(capsys, "chat", "--model", str(ckpt), "--prompt", "hi")
    assert "cannot read the tokenizer of" in err and "<IMG_CONTEXT>" in err and "pass image_token_id" not in err


def test_info_checks_every_tensor_header(ckpt, capsys):
    assert main(["info", "--model", str(ckpt)]) == 0
    assert "weights           ok:" in capsys.readouterr().out
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[:-1000])  # truncated
    assert "not a readable safetensors file" in cli_error(capsys, "info", "--model", str(ckpt))
    (ckpt / "model.safetensors").write_bytes(data)
    edit_config(ckpt, lambda c: c["llm_config"].update(intermediate_size=64))  # mismatched weights
    err = cli_error(capsys, "info", "--model", str(ckpt))
    assert "feed_forward.w1.weight: shape (128, 64) in model.safetensors, expected (64, 64)" in err
    assert check_weights(ckpt).startswith("wrong shape:")
