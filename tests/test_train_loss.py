"""`monovl.train.loss`: logits only where a label is, equal to the full-logits loss (and its gradients) to fp32
rounding, for packed and unpacked rows, with and without images; the chunked variant too."""
import re

import pytest
import torch
import torch.nn.functional as F

import monovl.train
from monovl.config import preset
from monovl.scratch import new_model
from monovl.train.freeze import freeze

IMG_START, IMG_END, IMG_CONTEXT = 497, 498, 499  # ids in the 512-token debug vocabulary


def _model(attention_experts=False):
    cfg = preset("debug", visual_attention_experts=attention_experts)
    cfg.image_token_id = IMG_CONTEXT
    return freeze(new_model(cfg, seed=3), "full").train()


def _sample(g, image: bool, n_prompt: int, n_answer: int):
    """(ids, labels) of one sample: [<s>] [image] prompt answer, loss on the answer only."""
    head = [1] + ([IMG_START] + [IMG_CONTEXT] * 4 + [IMG_END] if image else [])  # 4 tokens per 56² tile
    prompt = torch.randint(3, 400, (n_prompt,), generator=g).tolist()
    answer = torch.randint(3, 400, (n_answer,), generator=g).tolist()
    ids = head + prompt + answer
    return ids, [-100] * (len(head) + n_prompt) + answer


def _batch(packed: bool, images: bool, seed=0) -> dict:
    """Two rows; packed: each row holds two samples (positions restart at 0), the first with an image."""
    g = torch.Generator().manual_seed(seed)
    if packed:
        rows = [[_sample(g, images, 3, 5), _sample(g, False, 2, 4)],
                [_sample(g, images, 2, 6), _sample(g, False, 4, 3)]]
    else:
        rows = [[_sample(g, images, 3, 7)], [_sample(g, images, 5, 5)]]
    t = max(sum(len(s[0]) for s in row) for row in rows)
    ids, labels, pos = (torch.zeros(2, t, dtype=torch.long), torch.full((2, t), -100),
                        torch.zeros(2, t, dtype=torch.long))
    for r, row in enumerate(rows):
        at = 0
        for s_ids, s_labels in row:
            n = len(s_ids)
            ids[r, at:at + n], labels[r, at:at + n] = torch.tensor(s_ids), torch.tensor(s_labels)
            pos[r, at:at + n] = torch.arange(n)
            at += n
        pos[r, at:] = torch.arange(t - at)  # padding: a sample of its own, without labels
    n_tiles = int((ids == IMG_CONTEXT).sum()) // 4
    pixels = torch.randn(n_tiles, 3, 56, 56, generator=g) if n_tiles else None
    return {"input_ids": ids, "labels": labels, "input_pos": pos if packed else None, "pixel_values": pixels}


def _full_logits_loss(model, batch):
    """The reference: logits at every position, then the labelled ones."""
    logits = model(batch["input_ids"], batch["pixel_values"], input_pos=batch["input_pos"])  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100,
                           reduction="sum")


def _loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attention_experts", [False, True], ids=["v1", "v1.5"])
@pytest.mark.parametrize("images", [False, True], ids=["text", "images"])
@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_loss_equals_full_logits_loss_and_gradients(packed, images, attention_experts):
    model, batch = _model(attention_experts), _batch(packed, images)
    assert (batch["pixel_values"] is not None) == images
    ref, ref_grads = _loss_and_grads(model, lambda: _full_logits_loss(model, batch))
    for chunk in (0, 3):
        loss, grads = _loss_and_grads(model, lambda: monovl.train.loss(model, batch, chunk=chunk))
        assert loss.dtype == torch.float32 and loss > 0
        torch.testing.assert_close(loss, ref)
        assert grads.keys() == ref_grads.keys()
        assert "language_model.output.weight" in grads
        assert ("vision_model.embeddings.patch_embedding.weight" in grads) == images
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("images", [False, True], ids=["text", "images"])
def test_every_trainable_expert_gets_a_gradient_in_every_step(images):
    """An expert without tokens in a batch (the visual ones on text, the last layer's on the unlabelled image
    positions) gets a zero gradient, not none: FSDP's processes then reduce the same tensors whatever their batch."""
    model = _model(attention_experts=True)
    _, grads = _loss_and_grads(model, lambda: monovl.train.loss(model, _batch(packed=True, images=images)))
    routed = {n for n, p in model.language_model.named_parameters() if p.requires_grad}
    assert {n.removeprefix("language_model.") for n in grads} >= routed
    last = f"model.layers.{model.cfg.llm.num_hidden_layers - 1}."
    for name in routed:
        if "_ve." in name and (not images or name.startswith(last + "feed_forward_ve")):
            assert not grads["language_model." + name].any(), name


def _head_rows(model, fn) -> list[int]:
    rows = []
    handle = model.language_model.head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    try:
        fn()
    finally:
        handle.remove()
    return rows


def test_head_runs_only_on_labelled_positions_and_in_chunks():
    model, batch = _model(), _batch(packed=True, images=True)
    n_labels = int((batch["labels"][:, 1:] != -100).sum())
    assert n_labels < batch["input_ids"].numel() // 2
    assert _head_rows(model, lambda: monovl.train.loss(model, batch)) == [n_labels]
    rows = _head_rows(model, lambda: monovl.train.loss(model, batch, chunk=5).backward())
    forward = [5] * (n_labels // 5) + ([n_labels % 5] if n_labels % 5 else [])
    assert sorted(rows) == sorted(forward * 2)  # each chunk once forward, once recomputed in the backward pass


def test_no_label_gives_zero_and_unknown_names_fail():
    model, batch = _model(), _batch(packed=False, images=True)
    batch["labels"] = torch.full_like(batch["labels"], -100)
    assert float(monovl.train.loss(model, batch).detach()) == 0.0
    with pytest.raises(AttributeError, match="no attribute 'losses'"):
        monovl.train.losses  # noqa: B018


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # the vision input needs no gradient
def test_shapes_bench_and_profile_measure_each_path():
    from monovl.train.memory_shapes import PATHS, _config, measure_head, measure_step, profile_step, shape_batch
    from monovl.scratch import random_model
    from monovl.train.freeze import param_groups

    cfg = _config("debug", 1)
    for shape, (n_text, n_answer) in (("s1.1", (32, 32)), ("s2", (256, 64))):
        batch = shape_batch(cfg, shape)
        assert batch["input_ids"].shape == (1, 1 + cfg.num_image_token + n_text)
        assert int((batch["labels"] != -100).sum()) == n_answer
    flops = {}
    for path in PATHS:
        r = measure_step("s2", path, "debug", 1, "full", 1)
        assert r["step_s"] > 0 and r["tokens"] == 1 + 4 + 256
        flops[path] = r["flops"]
        assert measure_head("s1.1", path, "debug", "s1.1", 1)["head_s"] > 0
    # both experts on every token > routed > logits only at the 64 labelled rows; chunking recomputes those
    assert flops["dense"] > flops["full"] > flops["labelled"] > 0 and flops["chunked"] > flops["labelled"]
    model = random_model(cfg).train()
    times = profile_step(model, shape_batch(cfg, "s2"), torch.optim.AdamW(param_groups(model, 0.0), lr=1e-3))
    parts = {"vision (patch embedding, mlp1)", "attention projections", "FFN experts", "optimizer (AdamW)",
             "head (final norm, output; labelled rows)", "RMSNorms in the layers", "step"}
    assert set(times) == parts and all(t > 0 for t in times.values())
    assert sum(v for k, v in times.items() if k not in ("step", "optimizer (AdamW)")) < times["step"]


def test_flop_counter_counts_the_cpu_attention_kernels():
    from monovl.train.memory_shapes import flop_counter

    q = torch.randn(1, 4, 16, 8, requires_grad=True)
    k, v = (torch.randn(1, 2, 16, 8, requires_grad=True) for _ in range(2))
    with flop_counter() as counter:
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
    per_product = 2 * 4 * 16 * 16 * 8  # one (16 × 8) @ (8 × 16)-sized product per head: 2·s·s·d multiply-adds
    assert counter.get_total_flops() == (2 + 5) * per_product  # forward: scores, output; backward: 5 products


def test_ffn_bench_times_dense_routed_and_one_ffn(capsys):
    from monovl.train.memory import main

    assert main(["--ffn", "--preset", "debug", "--seq-len", "16", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("debug FFN (64 → 128), 16 tokens, half visual")
    times = {m[0]: float(m[1]) for m in re.findall(r"^  (dense|routed|one FFN) +([\d.e-]+) s$", out, re.M)}
    assert set(times) == {"dense", "routed", "one FFN"} and all(t > 0 for t in times.values())
    assert re.search(r"routed is [\d.]+x dense and runs at \d+% of one FFN's rate", out)


def test_train_bench_is_the_shapes_benchmark(monkeypatch):
    from monovl.train import bench, memory_shapes

    seen = {}
    monkeypatch.setattr(memory_shapes, "main", lambda args: seen.update(vars(args)) or 0)
    assert bench.main(["--stage", "s1.1", "--shape", "s1.1", "--layers", "8"]) == 0
    assert seen["shapes"] and (seen["stage"], seen["shape"], seen["layers"]) == ("s1.1", "s1.1", 8)
    with pytest.raises(SystemExit, match="use python -m monovl.train.memory"):
        bench.main(["--profile"])


STAND_IN = '''
import torch
from torch import nn


class InternVLChatConfig:
    def __init__(self, llm_config, vision_config, **kw):
        self.llm_config, self.vision_config = llm_config, vision_config


class InternVLChatModel(nn.Module):
    """Stands in for the official class: the names the freeze patterns meet, a loss over the given labels."""
    def __init__(self, config):
        super().__init__()
        d = config.llm_config["hidden_size"]
        self.vision_model = nn.Linear(d, d)
        self.language_model = nn.ModuleDict({"feed_forward": nn.Linear(d, d), "feed_forward_ve": nn.Linear(d, d)})
        self.img_context_token_id = None

    def forward(self, pixel_values, input_ids, attention_mask, image_flags, labels):
        assert attention_mask.shape == input_ids.shape and image_flags.shape == (1, 1)
        n_img = int((input_ids == self.img_context_token_id).sum())
        x = torch.ones(n_img, self.vision_model.in_features)
        h = self.language_model["feed_forward_ve"](self.vision_model(x)) + self.language_model["feed_forward"](x)
        return type("Out", (), {"loss": h.sum() * (labels != -100).sum()})()
'''


def test_bench_times_the_official_code_on_the_same_batch_and_freeze(tmp_path):
    import argparse
    import sys

    from monovl.train.memory_shapes import _config, _official

    (tmp_path / "internvl/model/internvl_chat").mkdir(parents=True)
    (tmp_path / "internvl/model/internvl_chat/__init__.py").write_text(STAND_IN)
    args = argparse.Namespace(preset="debug", layers=1, stage="s1.1", steps=1, official_code=str(tmp_path),
                              official_python=sys.executable)
    r = _official(args, "s1.1")
    d = _config("debug", 1).llm.hidden_size
    assert r["step_s"] > 0 and r["tokens"] == 1 + _config("debug", 1).num_image_token + 32
    assert r["trainable"] == 2 * (d * d + d)  # vision_model.* and *.feed_forward_ve.* train in S1.1; not the rest
    with pytest.raises(SystemExit, match="the official model code's step failed"):
        _official(argparse.Namespace(**{**vars(args), "official_code": str(tmp_path / "nothing")}), "s1.1")
