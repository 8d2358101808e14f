"""The loss-path benchmark of `python -m monovl.train.memory --shapes`: one training step (forward, loss,
backward) on two sample shapes, three ways, each in a fresh subprocess so peak memories do not mix:

- `dense`: logits at every position and both FFN experts on every token, blended by the mask (what the
  official model code computes; monovl's `dense=True`),
- `full`: routed experts, logits at every position (monovl's loss before `head_loss`),
- `labelled`: `monovl.train.loss`, logits only where a label is,
- `chunked`: the same with `loss_chunk = 16` (at most 16 rows of logits at a time, recomputed in the backward);
- with `--official-code DIR`, also `official`: the official model code's `InternVLChatModel.forward(...,
  labels=...)` + `backward()` on the same geometry, batch and freeze (`official_step.py`, run by
  `--official-python`, an interpreter with the official code's pinned dependencies).

The head's share is the time of the loss path alone (final norm, head, cross-entropy, their backward) on the
same shape, measured in its own subprocess, over the step time; its peak is that subprocess's peak memory
less the head's weight gradient and less what a one-row loss first allocated (the math libraries' buffers): the
logits, their gradient and the cross-entropy's buffers.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {"s1.1": (32, 32), "s2": (256, 64)}  # shape → (text tokens after the tile, answer tokens at the end)
PATHS = ("dense", "full", "labelled", "chunked")
LOSS_CHUNK = {"labelled": 0, "chunked": 16}  # the paths through `head_loss`, with their loss_chunk


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_since(base: int) -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base


def _config(preset_name: str, layers: int = 0):
    """The preset (with `layers` decoder layers, 0 = its own), <IMG_CONTEXT> where `random_model` puts it."""
    from monovl.config import preset

    cfg = preset(preset_name, **({"num_hidden_layers": layers} if layers else {}))
    cfg.image_token_id = cfg.image_token_id if cfg.image_token_id is not None else cfg.llm.vocab_size - 7
    return cfg


def shape_batch(cfg, shape: str) -> dict:
    """One row: <s>, one tile's image tokens, then text; labels on the last `answer` tokens only."""
    n_text, n_answer = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    text = torch.randint(3, cfg.image_token_id - 16, (n_text,), generator=g)
    ids = torch.cat([torch.tensor([1]), torch.full((cfg.num_image_token,), cfg.image_token_id), text])[None]
    labels = torch.full_like(ids, -100)
    labels[:, -n_answer:] = ids[:, -n_answer:]
    s = cfg.vision.image_size
    pixel_values = torch.randn(1, 3, s, s, generator=g)
    return {"input_ids": ids, "labels": labels, "input_pos": None, "pixel_values": pixel_values}


def _path_loss(model, batch: dict, path: str) -> torch.Tensor:
    from monovl.train import loss

    if path in LOSS_CHUNK:
        return loss(model, batch, chunk=LOSS_CHUNK[path])
    logits = model(batch["input_ids"], batch["pixel_values"], dense=path == "dense")  # (1, T, V)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum")


def measure_step(shape: str, path: str, preset_name: str, layers: int, stage: str, steps: int) -> dict:
    """Seconds per forward + loss + backward step and peak memory of the whole step, in this process."""
    from monovl.scratch import random_model
    from monovl.train.freeze import freeze

    base = _rss_bytes()
    cfg = _config(preset_name, layers)
    model = freeze(random_model(cfg).train(), stage)
    batch = shape_batch(cfg, shape)
    times, counter = [], flop_counter()
    for i in range(steps + 1):  # the first step (allocation, warm-up; FLOPs counted) is not timed
        t0 = time.perf_counter()
        with counter if i == 0 else contextlib.nullcontext():
            _path_loss(model, batch, path).backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times[1:]), "peak_bytes": _peak_since(base),
            "tokens": batch["input_ids"].numel(), "flops": counter.get_total_flops()}


def flop_counter():
    """torch's FLOP counter (matrix products, attention, convolutions; forward and backward), which also counts
    the CPU flash-attention kernels that scaled_dot_product_attention runs here (torch maps only the GPU ones) and
    the in-place `addmm_` that the chunked loss accumulates its weight gradient with."""
    from torch.utils.flop_counter import FlopCounterMode, mm_flop, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten.addmm_: lambda _, a, b, *__, **___: mm_flop(a, b),
        aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, **__: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *_, **__: sdpa_backward_flop_count(g, q, k, v)})


def measure_head(shape: str, path: str, preset_name: str, stage: str, steps: int) -> dict:
    """Seconds and peak memory of the loss path alone: final norm, head, cross-entropy and their backward. The
    peak leaves out the head's weight gradient (when the stage trains the head), which every path needs."""
    from monovl.model.decoder import RMSNorm
    from monovl.model.head_loss import head_loss
    from monovl.train.freeze import STAGES

    cfg = _config(preset_name)
    d, v = cfg.llm.hidden_size, cfg.llm.vocab_size
    norm, head = RMSNorm(d, cfg.llm.rms_norm_eps), torch.nn.Linear(d, v, bias=False)
    torch.nn.init.normal_(head.weight, 0, 0.02)
    head.weight.requires_grad_(any(fnmatch.fnmatch("language_model.output.weight", p) for p in STAGES[stage]))
    labels = shape_batch(cfg, shape)["labels"]
    x = torch.randn(1, labels.shape[1], d, requires_grad=True)  # (1, T, D)
    one = torch.full_like(labels, -100)
    one[0, -1] = labels[0, -1]
    head_loss(x, one, norm, head).backward()  # one row first: the math libraries' own buffers are not the path's
    x.grad = head.weight.grad = None
    base, times = _rss_bytes(), []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        if path in LOSS_CHUNK:
            loss = head_loss(x, labels, norm, head, chunk=LOSS_CHUNK[path])
        else:
            loss = F.cross_entropy(head(norm(x))[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
        loss.backward()
        x.grad = head.weight.grad = None
        times.append(time.perf_counter() - t0)
    weight_grad = head.weight.numel() * 4 if head.weight.requires_grad else 0  # needed by any loss path
    return {"head_s": statistics.median(times[1:]), "head_peak_bytes": _peak_since(base) - weight_grad}


def _component(name: str) -> str | None:
    """The part of the step a module belongs to, for `profile_step`."""
    if name in ("vision_model", "mlp1"):
        return "vision (patch embedding, mlp1)"
    if name.endswith((".attention.wqkv", ".attention.wo", ".attention_ve.wqkv", ".attention_ve.wo")):
        return "attention projections"
    if name.endswith((".feed_forward", ".feed_forward_ve")):
        return "FFN experts"
    if name.endswith(("attention_norm", "ffn_norm")):
        return "RMSNorms in the layers"
    if name in ("language_model.model.norm", "language_model.output", "language_model.lm_head"):
        return "head (final norm, output; labelled rows)"
    return None


def profile_step(model, batch: dict, optimizer) -> dict[str, float]:
    """Seconds per part of one step (labelled loss, backward, optimizer step), from module hooks: forward between
    pre- and post-hook, backward between backward pre-hook and backward hook (autograd runs them in order on
    CPU). Attention itself (rope, softmax), the routing gathers and the vision part's backward (its input needs
    no gradient, so its hooks fire together) are the rest of `step`."""
    from monovl.train import loss

    times, started, hooks = {}, {}, []

    def timer(part: str, key: str, start: bool):
        def hook(*_):
            if start:
                started[key] = time.perf_counter()
            else:
                times[part] = times.get(part, 0.0) + time.perf_counter() - started.pop(key)
        return hook

    modules = [(n, m, _component(n)) for n, m in model.named_modules()]
    for name, m, part in [(n, m, p) for n, m, p in modules if p is not None]:
        hooks += [m.register_forward_pre_hook(timer(part, name, True)),
                  m.register_forward_hook(timer(part, name, False)),
                  m.register_full_backward_pre_hook(timer(part, name + "/b", True)),
                  m.register_full_backward_hook(timer(part, name + "/b", False))]
    try:
        t0 = time.perf_counter()
        loss(model, batch).backward()
        t1 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times["optimizer (AdamW)"], times["step"] = time.perf_counter() - t1, t1 - t0
    finally:
        for h in hooks:
            h.remove()
    return times


def profile_main(args) -> int:
    """`--profile`: the split of one S2-shaped step (labelled loss, backward, AdamW) after a warm-up step."""
    from monovl.scratch import random_model
    from monovl.train.freeze import adamw, freeze, param_groups

    cfg = _config(args.preset, args.layers)
    model = freeze(random_model(cfg).train(), args.stage)
    optimizer = adamw(param_groups(model, 0.05), lr=1e-6)
    batch = shape_batch(cfg, "s2")
    with warnings.catch_warnings():  # the vision part's input needs no gradient: said above, not an error
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        profile_step(model, batch, optimizer)  # warm-up: allocations, optimizer state
        times = profile_step(model, batch, optimizer)
    total = times["step"] + times["optimizer (AdamW)"]
    print(f"{args.preset}, {args.layers} layers, stage {args.stage}, S2 shape, fp32: step {total:.2f} s "
          "(forward + backward, then the optimizer)")
    rest = times["step"] - sum(v for k, v in times.items() if k not in ("step", "optimizer (AdamW)"))
    for part, sec in sorted([*times.items(), ("rest: attention core, rope, routing, embeddings, loss", rest)],
                            key=lambda kv: -kv[1]):
        if part != "step":
            print(f"  {part:55s} {sec:7.2f} s {sec / total:6.1%}")
    return 0


def ffn_main(args) -> int:
    """`--ffn`: one layer's FFN experts, forward + backward with weight gradients, on `--seq-len` tokens of which
    half are visual, three ways: `dense` (both experts on every token, then the mask picks), `routed` (each token
    through its own expert, as the trainer runs it off CUDA) and `one FFN` on every token (routing's multiply-adds
    as a single GEMM per weight: the rate `routed` could reach). Minimum over `--steps` alternating rounds."""
    from monovl.model.decoder import DecoderLayer
    from monovl.model.routing import Routing

    llm = dataclasses.replace(_config(args.preset, 1).llm, visual_ffn_experts=True, visual_attention_experts=False)
    torch.manual_seed(0)
    *_, text, visual = DecoderLayer(llm, 0).parts()  # the family's FFN and its visual expert
    x = torch.randn(1, args.seq_len, llm.hidden_size, requires_grad=True)
    mask = torch.zeros(1, args.seq_len, dtype=torch.bool)
    mask[:, 1:1 + args.seq_len // 2] = True  # <s>, then the image's tokens, then text
    ways = {"dense": lambda: Routing.build(mask, dense=True)(x, text.ffn, visual.ffn),
            "routed": lambda: Routing.build(mask)(x, text.ffn, visual.ffn), "one FFN": lambda: text.ffn(x)}
    best = dict.fromkeys(ways, float("inf"))
    for round_ in range(args.steps + 1):  # round 0 warms up
        for name, way in ways.items():
            start = time.perf_counter()
            way().sum().backward()
            if round_:
                best[name] = min(best[name], time.perf_counter() - start)
    print(f"{args.preset} FFN ({llm.hidden_size} → {llm.intermediate_size}), {args.seq_len} tokens, half visual, "
          f"fp32, {torch.get_num_threads()} threads, forward + backward, best of {args.steps}")
    for name, sec in best.items():
        print(f"  {name:8s} {sec:9.4g} s")
    print(f"  routed is {best['dense'] / best['routed']:.2f}x dense and runs at "
          f"{best['one FFN'] / best['routed']:.0%} of one FFN's rate (dense / one FFN: "
          f"{best['dense'] / best['one FFN']:.2f}x, the bound)")
    return 0


_MALLOC_ENV = os.environ | {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}  # every subprocess, the official one too


def _child(args, kind: str, shape: str, path: str) -> dict:
    """One measurement in a fresh process. glibc's malloc is given a fixed mmap threshold there: with its default
    (raised each time a large buffer is freed) freed logits stay in the heap and the peak RSS would measure the
    allocator's history rather than the memory the path holds."""
    cmd = [sys.executable, "-m", "monovl.train.memory_shapes", kind, shape, path, args.preset, str(args.layers),
           args.stage, str(args.steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=_MALLOC_ENV)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _official(args, shape: str) -> dict:
    """The official model code's step on the same geometry, batch and freeze, in `--official-python`."""
    from monovl.config import to_hf_config
    from monovl.train.freeze import trainable_patterns

    cfg = _config(args.preset, args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        files = [Path(tmp) / name for name in ("config.json", "batch.pt", "patterns.json")]
        files[0].write_text(json.dumps(to_hf_config(cfg) | {"img_context_token_id": cfg.image_token_id}))
        torch.save(shape_batch(cfg, shape), files[1])
        files[2].write_text(json.dumps(trainable_patterns(args.stage)))  # the stage's patterns; unknown: clear error
        cmd = [args.official_python, str(Path(__file__).with_name("official_step.py")), args.official_code,
               *map(str, files), str(args.steps)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=_MALLOC_ENV)  # same allocator
    if out.returncode != 0:
        raise SystemExit(f"the official model code's step failed ({' '.join(cmd[:3])}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(args) -> int:
    """Every (shape, path) step and loss path in a fresh process; a table with ratios to the `dense` path (and to
    the official code's step with `--official-code`)."""
    print(f"{args.preset}, {args.layers} layers, stage {args.stage}, fp32, {torch.get_num_threads()} threads, "
          f"forward + loss + backward, median of {args.steps} step(s) after a warm-up; FLOPs of a step and their "
          "rate from torch's FLOP counter")
    for shape in SHAPES if args.shape == "both" else [args.shape]:
        rows = {}
        official = _official(args, shape) if args.official_code else None
        if official:
            print(f"{shape:5s} official  {official['tokens'] / official['step_s']:8.1f} tokens/s "
                  f"({official['step_s']:6.2f} s/step; the official model code) | {_flops(official)}", flush=True)
        for path in PATHS:
            if args.loss_path_only and path == "dense":
                continue  # its loss path is the full one
            r = rows[path] = _child(args, "head", shape, "full" if path == "dense" else path)
            loss_path = f"loss path {r['head_s']:5.2f} s, peak {r['head_peak_bytes'] / 2**20:7.1f} MiB"
            if args.loss_path_only:
                print(f"{shape:5s} {path:9s} {loss_path}", flush=True)
                continue
            r |= _child(args, "step", shape, path)
            print(f"{shape:5s} {path:9s} {r['tokens'] / r['step_s']:8.1f} tokens/s ({r['step_s']:6.2f} s/step, "
                  f"{rows['dense']['step_s'] / r['step_s']:4.2f}x dense) | peak {r['peak_bytes'] / 2**30:6.2f} GiB | "
                  f"{loss_path} = {r['head_s'] / r['step_s']:5.1%} of the step"
                  + f" | {_flops(r)}" + (f" | {official['step_s'] / r['step_s']:4.2f}x official" if official else ""),
                  flush=True)
        for path in LOSS_CHUNK:
            ratio = rows[path]["head_peak_bytes"] / rows["full"]["head_peak_bytes"]
            print(f"{shape:5s} loss-path peak memory, {path} / full: {ratio:.3f}", flush=True)
        if official and not args.loss_path_only:
            print(f"{shape:5s} FLOPs, official / labelled: {official['flops'] / rows['labelled']['flops']:.2f}x "
                  "(the speed-up at the official code's FLOP rate)", flush=True)
    return 0


def _flops(r: dict) -> str:
    return f"{r['flops'] / 1e9:7.1f} GFLOP, {r['flops'] / r['step_s'] / 1e9:5.1f} GFLOP/s"


if __name__ == "__main__":
    kind, shape_, path_, preset_, layers_, stage_, steps_ = sys.argv[1:8]
    if kind == "step":
        result = measure_step(shape_, path_, preset_, int(layers_), stage_, int(steps_))
    else:
        result = measure_head(shape_, path_, preset_, stage_, int(steps_))
    print(json.dumps(result))
