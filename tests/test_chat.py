"""The user's entry points: monovl.load / chat / Conversation and the `monovl` CLI, on tiny checkpoints."""
import io
import json
from pathlib import Path
import sys

import pytest
import torch

import monovl
from monovl.cli import main
from monovl.template import build_query
from pictures import png
from spec_checkpoint import write_spec_checkpoint
from tokenizer_fixture import make_sp_tokenizer_dir


@pytest.fixture(scope="module")
def ckpt(random_ckpt):
    return random_ckpt


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "wide.png"
    path.write_bytes(png((150, 50)))
    return path


def test_image_token_id_read_from_sentencepiece_tokenizer_files(tmp_path):
    make_sp_tokenizer_dir(tmp_path / "tok")
    ck = write_spec_checkpoint(tmp_path / "ck", tokenizer_dir=tmp_path / "tok")
    model, tokenizer = monovl.load(tmp_path / "ck")
    assert model.cfg.image_token_id == tokenizer.img_context_id == ck["image_token_id"]
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("reuse", [False, True])
def test_conversation_renders_every_turn_with_its_images(ckpt, image, monkeypatch, reuse):
    model, tokenizer = monovl.load(ckpt)
    conv = monovl.Conversation(model, tokenizer, max_tiles=4, reuse_prefix=reuse)
    prompts = []
    chat_module = sys.modules["monovl.conversation"]
    real = chat_module.stream_generate

    def spy(model_, ids, pixels, **kw):
        prompts.append((ids[0].tolist(), None if pixels is None else pixels.shape[0]))
        yield from real(model_, ids, pixels, **kw)

    monkeypatch.setattr(chat_module, "stream_generate", spy)
    first = conv.ask("What is this?", [image], max_new_tokens=4)
    pieces = list(conv.stream("And now?", max_new_tokens=4))
    conv.ask("Compare.", [image, image], max_new_tokens=4)
    tiles = 4  # 150×50 → a 3×1 grid + thumbnail
    assert [t.num_tiles for t in conv.history] == [(tiles,), (), (tiles, tiles)]
    assert conv.history[0].question == "<image>\nWhat is this?" and conv.history[0].answer == first
    assert "".join(pieces).strip() == conv.history[1].answer
    n = model.cfg.num_image_token
    want = build_query("Compare.", [tiles, tiles], conv.history[:2], None, n)
    # the whole prompt every turn; without reuse every image's tiles, with it only those after the cached prefix
    assert prompts[2] == (tokenizer.encode(want), 2 * tiles if reuse else 3 * tiles)
    assert prompts[1][1] == (None if reuse else tiles)  # a text-only turn carries the first image unless cached


def test_chat_function_and_generation_settings(ckpt, image):
    model, tokenizer = monovl.load(ckpt)
    a, history = monovl.chat(model, tokenizer, "Describe.", images=[image], max_new_tokens=5)
    b, _ = monovl.chat(model, tokenizer, "Describe.", images=[image], max_new_tokens=5)
    assert a == b and len(history) == 1
    c, _ = monovl.chat(model, tokenizer, "Describe.", images=[image], max_new_tokens=5, temperature=1.0, seed=3)
    d, _ = monovl.chat(model, tokenizer, "Describe.", images=[image], max_new_tokens=5, temperature=1.0, seed=3)
    assert c == d


def test_cli_one_shot_and_info(ckpt, image, capsys):
    assert main(["chat", "--model", str(ckpt), "--image", str(image), "--prompt", "Hi", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    assert main(["info", "--model", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "InternVLChatModel" in out and "active per text token" in out and "<IMG_CONTEXT>" in out


def test_cli_interactive_attaches_image_mid_conversation(ckpt, image, monkeypatch, capsys):
    lines = f"hello\n/image {image}\nwhat is it?\n/reset\nagain\n/exit\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    assert main(["chat", "--model", str(ckpt), "--max-new-tokens", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("assistant> ") == 3 and f"attached: {image}" in captured.err


def test_cli_errors_are_clear(ckpt, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["chat", "--model", str(ckpt), "--image", str(bad), "--prompt", "x"]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["chat", "--model", str(tmp_path / "nowhere"), "--prompt", "x"]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err


def test_default_model_is_the_shipped_tiny_model(capsys, monkeypatch, tmp_path):
    from monovl.checkpoint import SHIPPED_MODEL

    image = str(Path(__file__).resolve().parents[1] / "examples" / "shapes.png")
    assert main(["chat", "--image", image, "--prompt", "How many shapes are there in the picture?",
                 "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip()
    assert json.loads((SHIPPED_MODEL / "config.json").read_text())["architectures"] == ["InternVLChatModel"]
    monkeypatch.setattr("monovl.checkpoint.SHIPPED_MODEL", tmp_path / "missing")
    assert main(["chat", "--prompt", "hi"]) == 2
    assert "--reproduce" in capsys.readouterr().err
