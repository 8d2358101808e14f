"""Weight-only int8 (`monovl.model.quant`): every backend against a float64 dequantized reference, whole-model
greedy agreement, quantized checkpoints (round trip and refusals)."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import monovl
from monovl import speed
from monovl.checkpoint import CheckpointError, load_model, save_model
from monovl.config import preset
from monovl.model import quant
from monovl.scratch import random_model

BACKENDS = ["int8pack"] + (["fbgemm"] if "fbgemm" in torch.backends.quantized.supported_engines else [])


def _reference(x, q, scale, bias=None):
    """x @ (q * scale)ᵀ + bias in float64: what every backend must compute."""
    y = x.double() @ (q.double() * scale.double()[:, None]).T
    return y if bias is None else y + bias.double()


def test_quantize_rows_is_symmetric_per_row_and_within_half_a_step():
    w = torch.randn(6, 40)
    w[2] = 0.0  # an all-zero row must not divide by zero
    q, scale = quant.quantize_rows(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (6,)
    assert int(q.abs().max()) == 127 and scale[2] == 1 and bool((q[2] == 0).all())
    assert torch.allclose(scale[0], w[0].abs().max() / 127)
    assert bool(((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", [1, 7])
def test_quant_linear_equals_the_dequantized_reference(backend, rows):
    g = torch.Generator().manual_seed(rows)
    lin = torch.nn.Linear(64, 48, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 64, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(48, generator=g))
    m = quant.QuantLinear.from_linear(lin, backend)
    q, scale = quant.quantize_rows(lin.weight)
    assert torch.equal(m.int8_weight(), q) and torch.equal(m.weight_scale, scale)
    x = torch.randn(2, rows, 64, generator=g) * 3  # (B, T, K)
    with torch.no_grad():
        y, plain = m(x), lin(x)
    ref = _reference(x.reshape(-1, 64), q, scale, lin.bias.detach()).reshape(2, rows, 48)
    assert y.shape == (2, rows, 48) and y.dtype == torch.float32
    # int8pack keeps x in fp32 (fp32 rounding only); fbgemm carries x at ~14 bits (see the module docstring).
    # Both are far below the int8 weight error itself, which the last line shows for scale.
    tol = 2e-6 if backend == "int8pack" else 3e-4
    assert float((y - ref).abs().max()) <= tol * float(ref.abs().max())
    weight_error = float((plain - ref).abs().max()) / float(ref.abs().max())
    assert weight_error > 10 * tol


def test_quant_embedding_dequantizes_the_rows_it_reads():
    emb = torch.nn.Embedding(30, 16)
    m = quant.QuantEmbedding.from_embedding(emb)
    ids = torch.tensor([[3, 0, 29], [3, 3, 7]])
    q, scale = quant.quantize_rows(emb.weight)
    assert torch.equal(m(ids), (q.float() * scale[:, None])[ids])


def test_int8_greedy_tokens_of_the_shipped_model_agree_with_fp32():
    model, tokenizer = monovl.load()
    qmodel, _ = monovl.load(quantize="int8")
    assert isinstance(qmodel.language_model.model.layers[0].feed_forward_ve.w1, quant.QuantLinear)
    assert isinstance(qmodel.language_model.output, quant.QuantLinear)
    assert isinstance(qmodel.language_model.model.tok_embeddings, quant.QuantEmbedding)
    assert isinstance(qmodel.mlp1[1], torch.nn.Linear)  # the vision part stays float
    for text, images in [("What colour is the circle?", ["examples/shapes.png"]), ("Describe a red square.", [])]:
        inputs = monovl.build_inputs(model, tokenizer, text, images=images)
        ids = inputs.input_ids[None]
        assert speed.token_agreement(model, qmodel, ids, inputs.pixel_values, n=64) >= 0.95
    assert speed.token_agreement(model, model, ids, None, n=8) == 1.0


def test_int8_weights_take_under_a_third_of_fp32():
    model = random_model(preset("debug", vocab_size=2048, hidden_size=128, intermediate_size=512))
    before = quant.weight_bytes(model)
    quant.quantize(model)
    assert quant.weight_bytes(model) <= 0.3 * before


@pytest.fixture(scope="module")
def int8_ckpt(random_ckpt, tmp_path_factory):
    model, tokenizer = monovl.load(random_ckpt, quantize="int8")
    out = tmp_path_factory.mktemp("int8") / "ckpt"
    save_model(model, out, tokenizer=tokenizer)
    return model, out


def test_quantized_checkpoint_round_trip(int8_ckpt):
    model, path = int8_ckpt
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "monovl-int8"
    tensors = load_file(str(path / "model.safetensors"))
    key = "language_model.model.layers.0.feed_forward.w1"
    assert tensors[key + ".weight"].dtype == torch.int8 and tensors[key + ".weight_scale"].dtype == torch.float32
    loaded = load_model(path)  # quantized, as its config says
    for name in quant.quantized_names(model):
        a, b = model.get_submodule(name), loaded.get_submodule(name)
        assert torch.equal(a.int8_weight(), b.int8_weight()) and torch.equal(a.weight_scale, b.weight_scale), name
    ids = torch.tensor([[1, 5, 9, 12, 3]])
    assert torch.equal(model(ids), loaded(ids))  # same backend on the same machine: the same numbers
    assert load_model(path, quantize="int8") is not None


def _copy(path, dst):
    dst.mkdir()
    for f in path.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_mismatched_quantized_checkpoints_are_refused(int8_ckpt, random_ckpt, tmp_path):
    _, path = int8_ckpt
    plain = _copy(path, tmp_path / "plain")  # int8 tensors, but the config lost its quantization_config
    cfg = json.loads((plain / "config.json").read_text())
    del cfg["quantization_config"]
    (plain / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="int8 scales"):
        load_model(plain)
    fake = _copy(random_ckpt, tmp_path / "fake")  # float tensors under a quantized config
    cfg = json.loads((fake / "config.json").read_text())
    cfg["quantization_config"] = json.loads((path / "config.json").read_text())["quantization_config"]
    (fake / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="lack their scales"):
        load_model(fake)
    cast = _copy(path, tmp_path / "cast")  # an int8 weight stored as float
    tensors = load_file(str(cast / "model.safetensors"))
    key = "language_model.model.layers.1.attention.wqkv.weight"
    tensors[key] = tensors[key].float()
    save_file(tensors, str(cast / "model.safetensors"))
    with pytest.raises(CheckpointError, match="wqkv.weight: dtype float32.*expected int8"):
        load_model(cast)
    other = _copy(path, tmp_path / "other")
    cfg = json.loads((other / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 4
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quantization_config"):
        load_model(other)
    with pytest.raises(ValueError, match="unknown quantization"):
        load_model(random_ckpt, quantize="int4")


def test_a_tied_head_is_quantized_on_its_own_and_round_trips(tmp_path):
    cfg = preset("debug", family="qwen2", tie_word_embeddings=True, qkv_bias=True)  # Qwen2: q/k/v biases
    model = quant.quantize(random_model(cfg))
    lm = model.language_model
    assert lm.head is not lm.embed_tokens and torch.equal(lm.head.int8_weight(), lm.embed_tokens.weight)
    save_model(model, tmp_path / "q")
    loaded = load_model(tmp_path / "q", image_token_id=cfg.image_token_id)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(model(ids), loaded(ids))


def test_header_checks_accept_int8_weights_only_where_quantized(int8_ckpt, tmp_path):
    from monovl.checkpoint import check_weights
    _, path = int8_ckpt
    assert check_weights(path) == ""  # int8 weights beside their fp32 scales, config says int8
    norm = "language_model.model.norm.weight"
    odd = _copy(path, tmp_path / "odd")  # an integer tensor where no int8 module is: still refused
    tensors = load_file(str(odd / "model.safetensors"))
    tensors[norm] = tensors[norm].to(torch.int8)
    save_file(tensors, str(odd / "model.safetensors"))
    assert f"not floating-point weights" in check_weights(odd) and f"{norm} (I8)" in check_weights(odd)
    with pytest.raises(CheckpointError, match="not floating-point weights"):
        load_model(odd)
    bad = _copy(path, tmp_path / "bad")  # int8 weights are not checked for NaN, float scales are
    tensors = load_file(str(bad / "model.safetensors"))
    scale = "language_model.model.layers.0.feed_forward.w1.weight_scale"
    tensors[scale][0] = float("nan")
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"NaN or inf values in 1 tensor\\(s\\): {scale}"):
        load_model(bad)
