"""The loader + model against an independent float64 reference written from the spec (tests/reference.py)."""
import pytest
import torch

from monovl.checkpoint import load_model
from reference import reference_logits, reference_vision_features
from spec_checkpoint import write_spec_checkpoint

TOL = dict(rtol=1e-4, atol=1e-4)


def prompt(ck, pieces, seed=0):
    """pieces: ints = that many random text tokens, "img" = one tile's context tokens."""
    g = torch.Generator().manual_seed(seed)
    vocab = ck["config"]["llm_config"]["vocab_size"]
    parts = [torch.full((ck["num_image_token"],), ck["image_token_id"]) if p == "img"
             else torch.randint(3, vocab - 9, (p,), generator=g) for p in pieces]
    return torch.cat(parts)


CASES = {
    "v1": {},
    "v1.5-attention-experts": dict(visual_attention_experts=True),
    "ps-v1": dict(ps_version="v1"),
    "linear-rope": dict(rope_scaling={"type": "linear", "factor": 2.0}),
    "dynamic-rope": dict(rope_scaling={"type": "dynamic", "factor": 2.0},
                         extra_config={"llm_config": {"max_position_embeddings": 16}}),
    "mha-sharded-fp32": dict(kv_heads=4, dtype=torch.float32, shard_bytes=100_000),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_match_reference(case, tmp_path):
    ck = write_spec_checkpoint(tmp_path / case, seed=3, **CASES[case])
    model = load_model(tmp_path / case, dtype=torch.float32, image_token_id=ck["image_token_id"])
    ids = torch.stack([prompt(ck, [5, "img", 3, "img", 4], seed=1), prompt(ck, [2, "img", 9, "img", 1], seed=2)])
    pv = torch.randn(4, 3, 56, 56)
    want = reference_logits(ck["state_dict"], ck["config"], ids, pv, image_token_id=ck["image_token_id"])
    got = model(ids, pv)
    torch.testing.assert_close(got.double(), want, **TOL)
    text = prompt(ck, [20], seed=3)[None]
    torch.testing.assert_close(model(text).double(), reference_logits(ck["state_dict"], ck["config"], text), **TOL)


def test_position_table_resized_for_other_tile_sizes(tmp_path):
    ck = write_spec_checkpoint(tmp_path / "ck", seed=4)
    model = load_model(tmp_path / "ck", image_token_id=ck["image_token_id"])
    pv = torch.randn(2, 3, 84, 84)  # a 6×6 patch grid against the stored 4×4 table
    want = reference_vision_features(ck["state_dict"], ck["config"], pv)
    torch.testing.assert_close(model.extract_feature(pv).double(), want, **TOL)


def test_bf16_checkpoint_in_bf16_close_to_reference(tmp_path):
    ck = write_spec_checkpoint(tmp_path / "ck", seed=5)
    model = load_model(tmp_path / "ck", dtype=torch.bfloat16, image_token_id=ck["image_token_id"])
    ids = prompt(ck, [3, "img", 4], seed=6)[None]
    pv = torch.randn(1, 3, 56, 56)
    want = reference_logits(ck["state_dict"], ck["config"], ids, pv, image_token_id=ck["image_token_id"])
    got = model(ids, pv.bfloat16()).double()
    assert (got - want).abs().max() < 0.1 * want.abs().max()  # bf16 keeps ~3 significant digits per op
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.8
