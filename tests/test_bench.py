"""`monovl bench`: the figures it prints, the JSON last line, and the decode-bytes count behind the roofline."""
import json

import torch

from monovl import speed
from monovl.cli import main
from monovl.config import preset
from monovl.scratch import random_model


def test_bench_json_last_line_has_every_figure(monkeypatch, capsys):
    machine = speed.Machine
    monkeypatch.setattr(speed, "Machine", lambda **kw: machine(n=128, gib=1 / 256, **kw))  # small, for speed
    assert main(["bench", "--preset", "debug", "--quantize", "int8", "--modular", "--json", "--repeat", "1",
                 "--decode-tokens", "2", "--agreement-tokens", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    out = json.loads(lines[-1])
    for key in ("ttft_ms", "decode_tok_s", "dense_ttft_ms", "prefill_gflops", "gemm_peak_gflops", "bandwidth_gbs",
                "decode_tok_s_int8", "ttft_ms_int8", "int8_token_agreement", "turn2_ttft_ms", "decode_roofline_frac",
                "weights_gib", "weights_gib_int8", "modular_ttft_ms", "mono_over_modular"):
        assert isinstance(out[key], (int, float)) and out[key] >= 0, key
    assert 0 <= out["int8_token_agreement"] <= 1 and out["weights_gib_int8"] < out["weights_gib"]
    assert out["tokens"] == 36 and out["visual_tokens"] == 4  # debug preset: 4 tokens per tile, 32 text
    assert any(line.startswith("int8 (") for line in lines[:-1])


def test_decode_bytes_are_the_text_weights_and_the_kv_cache():
    model = random_model(preset("debug"))
    c = model.cfg.llm
    f = speed.count(model, n_text=10, num_visual=4, tiles=1, decode_kv=20)
    text_linears = sum(p.numel() for n, p in model.language_model.named_parameters()
                       if p.dim() == 2 and "_ve." not in n and "tok_embeddings" not in n)  # + head
    small = c.num_hidden_layers * 2 * c.hidden_size + 2 * c.hidden_size
    kv = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * 20
    assert f.decode_bytes == 4 * (text_linears + small + kv)
    f8 = speed.count(model, n_text=10, num_visual=4, tiles=1, decode_kv=20, weight_bytes=1.0)
    assert f8.decode_bytes == text_linears + 4 * (small + kv)
    m = speed.Machine(n=64, gib=1 / 512).measure(repeat=1)
    first = (m.gemm_peak_gflops, m.bandwidth_gbs)
    assert min(first) > 0 and m.measure(repeat=1).bandwidth_gbs >= first[1]  # the best of the rounds


def test_the_modular_encoder_gives_the_tokens_the_llm_expects():
    from monovl.model.vit import random_encoder
    cfg = preset("debug")
    enc = random_encoder(cfg, layers=2)
    v = cfg.vision
    out = enc(torch.randn(3, 3, v.image_size, v.image_size))
    assert out.shape == (3, cfg.num_image_token, cfg.llm.hidden_size) and bool(out.isfinite().all())
    assert len(enc.layers) == 2 and enc.layers[0].fc1.out_features == 4 * v.hidden_size
