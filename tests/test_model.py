"""Routing, KV cache and generation on the tiny `debug` preset (random weights)."""
import copy

import pytest
import torch

from monovl.config import preset
from monovl.generation import generate
from monovl.model import MonoInternVL

IMG = 500  # <IMG_CONTEXT> id for these tests; 4 tokens per 56-pixel tile in the debug preset


def make_model(seed=0, **llm):
    cfg = preset("debug", **llm)
    cfg.image_token_id = IMG
    torch.manual_seed(seed)
    model = MonoInternVL(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger weights than the default init, so routing mistakes show
            p.normal_(0, 0.3 if p.dim() > 1 else 0.1).add_(1.0 if p.dim() == 1 else 0.0)
    return model


def prompt(n_text, images_at=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 400, (n_text,), generator=g)
    for at in sorted(images_at, reverse=True):
        ids = torch.cat([ids[:at], torch.full((4,), IMG), ids[at:]])
    return ids


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def model_v15():
    return make_model(seed=1, visual_attention_experts=True)


def test_text_only_equals_plain_internlm2(model):
    plain_cfg = copy.deepcopy(model.cfg)
    plain_cfg.llm.visual_ffn_experts = False
    plain = MonoInternVL(plain_cfg).eval()
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(".feed_forward_ve." in k for k in unexpected)
    ids = torch.stack([prompt(9, seed=1), prompt(9, seed=2)])
    assert torch.equal(model(ids), plain(ids))


@pytest.mark.parametrize("fixture", ["model", "model_v15"])
def test_each_token_runs_through_its_own_expert_only(fixture, request):
    model = request.getfixturevalue(fixture)
    layer = model.language_model.model.layers[0]
    seen = {}

    def count(name):
        def hook(module, inputs, output):
            seen[name] = seen.get(name, 0) + inputs[0].shape[0]
        return hook
    hooks = [m.register_forward_hook(count(name))
             for name, m in [("text", layer.feed_forward.w1), ("visual", layer.feed_forward_ve.w1)]]
    ids = torch.stack([prompt(6, [2]), prompt(6, [1])])  # 2 rows × 10 tokens, 8 of them visual
    try:
        model(ids, torch.randn(2, 3, 56, 56))
    finally:
        for h in hooks:
            h.remove()
    assert seen == {"text": 12, "visual": 8}


@pytest.mark.parametrize("fixture", ["model", "model_v15"])
def test_routed_equals_dense_blend(fixture, request):
    model = request.getfixturevalue(fixture)
    ids = torch.stack([prompt(8, [3]), prompt(8, [0])])
    pv = torch.randn(2, 3, 56, 56)
    routed, dense = model(ids, pv), model(ids, pv, dense=True)
    torch.testing.assert_close(routed, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fixture", ["model", "model_v15"])
def test_text_logits_ignore_visual_weights(fixture, request):
    model = request.getfixturevalue(fixture)
    ids = prompt(10)[None]
    before = model(ids)
    poisoned = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in poisoned.named_parameters():
            if "_ve." in name:
                p.fill_(float("nan"))
    assert torch.equal(poisoned(ids), before)
    image_ids = prompt(6, [2])[None]
    assert poisoned(image_ids, torch.randn(1, 3, 56, 56))[0, 2:].isnan().all()


def test_cached_greedy_equals_recompute(model):
    ids, pv = prompt(8, [2]), torch.randn(1, 3, 56, 56)
    cached = generate(model, [ids], pv, max_new_tokens=8)[0].tolist()
    seq, recomputed = ids, []
    for _ in range(8):
        tok = model(seq[None], pv)[0, -1].argmax()
        recomputed.append(int(tok))
        seq = torch.cat([seq, tok[None]])
    assert cached == recomputed


@pytest.mark.parametrize("fixture", ["model", "model_v15"])
def test_image_in_second_turn_after_cached_first_turn(fixture, request):
    model = request.getfixturevalue(fixture)
    turn1, turn2 = prompt(7, seed=3), prompt(9, [4], seed=4)
    pv = torch.randn(1, 3, 56, 56)
    whole = model(torch.cat([turn1, turn2])[None], pv)
    cache = model.new_cache(1, 32)
    t1 = len(turn1)
    first = model(turn1[None], input_pos=torch.arange(t1)[None], cache=cache)
    second = model(turn2[None], pv, input_pos=torch.arange(t1, t1 + len(turn2))[None], cache=cache)
    torch.testing.assert_close(first, whole[:, :t1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, whole[:, t1:], rtol=1e-5, atol=1e-5)


def test_batch_mixing_prefill_and_decode_rows(model_v15):
    model = model_v15
    pad = model.cfg.llm.pad_token_id
    past, new = prompt(6, seed=5), prompt(2, [1], seed=6)  # row 0 decodes 1 token; row 1 prefills an image
    pv = torch.randn(1, 3, 56, 56)
    cache = model.new_cache(2, 16)
    model(past[None].expand(2, -1), input_pos=torch.arange(6).expand(2, 6), cache=cache)  # both rows' history
    ids = torch.full((2, 6), pad)
    ids[0, 0], ids[1] = 42, new
    pos = torch.stack([torch.arange(6, 12), torch.arange(6, 12)])
    mixed = model(ids, pv, input_pos=pos, cache=cache)
    alone0 = model(torch.cat([past, torch.tensor([42])])[None])[0, -1]
    alone1 = model(torch.cat([past, new])[None], pv)[0, 6:]
    torch.testing.assert_close(mixed[0, 0], alone0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], alone1, rtol=1e-5, atol=1e-5)


def test_cache_rows_default_to_every_row_in_order(model):
    ids, pv = torch.stack([prompt(9, [2], seed=7), prompt(13, seed=8)]), torch.randn(1, 3, 56, 56)
    pos = torch.arange(13).expand(2, 13)
    default, explicit = model.new_cache(2, 16), model.new_cache(2, 16)
    a = model(ids, pv, input_pos=pos, cache=default)
    b = model(ids, pv, input_pos=pos, cache=explicit, cache_rows=torch.arange(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(default.k, explicit.k) and torch.equal(default.v, explicit.v)


def test_batched_generation_equals_alone(model):
    rows = [prompt(9, [2], seed=7), prompt(5, seed=8), prompt(12, [0, 7], seed=9)]
    pvs = [torch.randn(1, 3, 56, 56), None, torch.randn(2, 3, 56, 56)]
    alone = [generate(model, [r], p, max_new_tokens=6)[0] for r, p in zip(rows, pvs)]
    batched = generate(model, rows, torch.cat([p for p in pvs if p is not None]), max_new_tokens=6)
    for a, b in zip(alone, batched):
        assert a.tolist() == b.tolist()


def test_generation_stops_and_pads(model):
    ids = prompt(6)
    free = generate(model, [ids], max_new_tokens=6)[0]
    stop = int(free[2])
    out = generate(model, [ids, ids], max_new_tokens=6, stop_token_ids=[stop], pad_token_id=0)
    first = free.tolist().index(stop)
    assert out.shape[1] == first + 1 and out[0].tolist() == free[: first + 1].tolist()


def test_sampling_is_seeded_and_respects_top_k(model):
    ids = prompt(6)
    a = generate(model, [ids], max_new_tokens=8, temperature=1.0, top_k=3, seed=11)
    b = generate(model, [ids], max_new_tokens=8, temperature=1.0, top_k=3, seed=11)
    assert torch.equal(a, b)
    logits = model(ids[None])[0, -1]
    assert int(a[0, 0]) in logits.topk(3).indices.tolist()


def test_image_token_count_mismatch_is_an_error(model):
    with pytest.raises(ValueError, match="4 tiles"):
        model(prompt(6, [2])[None], torch.randn(4, 3, 56, 56))


@pytest.mark.parametrize("fixture", ["model", "model_v15"])
def test_packed_samples_equal_separate_forwards(fixture, request):
    model = copy.deepcopy(request.getfixturevalue(fixture)).double()  # float64: only the masking can differ
    a, b = prompt(7, [2], seed=12), prompt(5, seed=13)
    pv = torch.randn(1, 3, 56, 56, dtype=torch.float64)
    packed = torch.cat([a, b])[None]
    pos = torch.cat([torch.arange(len(a)), torch.arange(len(b))])[None]
    out = model(packed, pv, input_pos=pos)
    sep_a, sep_b = model(a[None], pv)[0], model(b[None])[0]
    torch.testing.assert_close(out[0, : len(a)], sep_a, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out[0, len(a):], sep_b, rtol=1e-10, atol=1e-10)
    # and the gradients: each packed sample attends within itself in the backward pass too
    w = torch.randn(out.shape[1:], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    params = [p for p in model.parameters()]
    packed_grads = torch.autograd.grad((out[0] * w).sum(), params, allow_unused=True)
    sep_grads = torch.autograd.grad((sep_a * w[: len(a)]).sum() + (sep_b * w[len(a):]).sum(), params,
                                    allow_unused=True)
    for g_packed, g_sep in zip(packed_grads, sep_grads):
        assert (g_packed is None) == (g_sep is None)
        if g_packed is not None:
            torch.testing.assert_close(g_packed, g_sep, rtol=1e-10, atol=1e-10)
