"""Training benchmark: tokens/s and peak memory of delta tuning (S1.1: visual parts only) vs full tuning of
the same model, each in a fresh subprocess so peak memories do not mix.

    python -m monovl.train.memory --preset mono-internvl-2b --layers 2 --steps 3

`--shapes` instead measures the loss path (`monovl.train.memory_shapes`): a forward + backward step on the
S1.1 shape (1 tile + a 32-token caption) and the S2 shape (1 tile + 256 text tokens, a 64-token answer), with
logits at every position (the dense blend of both experts, as the official code; or routed experts) and with
logits only where a label is (`monovl.train.loss`), and the share of the head in each; `--profile` splits one
S2-shaped step (with AdamW) by part of the model; `--ffn` times one layer's FFN experts dense, routed, and as one
FFN on every token (the rate routing could reach).

Peak memory is `torch.cuda.max_memory_allocated` on GPU; on CPU the process's peak resident set minus its
resident set just before the model was built (so the interpreter and torch itself do not count).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(stage: str, preset_name: str, layers: int, batch: int, seq_len: int, steps: int, device: str,
            ac: bool) -> dict:
    """Train `steps` AdamW steps of `stage` on synthetic data in this process; tokens/s and peak memory.
    On CPU the peak is the process's, so call this in a fresh process (as `main` does)."""
    from monovl.config import preset
    from monovl.scratch import random_model
    from monovl.train.freeze import adamw, freeze, param_groups
    from monovl.train.loop import SyntheticData
    from monovl.train.objective import loss
    from monovl.train.parallel import apply_ac
    from monovl.train.recipe import TrainConfig

    dev = torch.device(device)
    base = _rss_bytes()
    cfg = preset(preset_name, **({"num_hidden_layers": layers} if layers else {}))
    model = freeze(random_model(cfg, device=dev).train(), stage)
    if ac:
        apply_ac(model)
    opt = adamw(param_groups(model, 0.05), lr=1e-5)
    tc = TrainConfig()
    tc.data.batch_size, tc.data.seq_len = batch, seq_len
    data = SyntheticData(tc, cfg)
    autocast = torch.bfloat16 if dev.type == "cuda" else None
    times = []
    for _ in range(steps + 1):  # the first step (allocation, warm-up) is not timed
        b = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in next(data).items()}
        t0 = time.perf_counter()
        mean = loss(model, b, autocast) / (b["labels"][:, 1:] != -100).sum()
        mean.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"stage": stage, "tokens_per_s": batch * seq_len * steps / sum(times[1:]), "peak_bytes": peak,
            "trainable": trainable, "params": sum(p.numel() for p in model.parameters())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="mono-internvl-2b")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (0 = the preset's)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ac", action="store_true", help="activation checkpointing")
    p.add_argument("--shapes", action="store_true", help="the loss-path benchmark on the S1.1 and S2 shapes")
    p.add_argument("--stage", default="full", help="--shapes: the freeze stage (full = everything trainable)")
    p.add_argument("--shape", default="both", choices=["s1.1", "s2", "both"], help="--shapes: which sample shape")
    p.add_argument("--loss-path-only", action="store_true",
                   help="--shapes: measure the loss path alone (seconds, peak memory), not the whole steps")
    p.add_argument("--official-code", help="--shapes: also time the official model code's step: the folder that "
                   "holds its `internvl` package")
    p.add_argument("--official-python", default=sys.executable,
                   help="--shapes: the interpreter for the official code (its pinned transformers, peft, timm)")
    p.add_argument("--profile", action="store_true", help="the split of one S2-shaped step by part of the model")
    p.add_argument("--ffn", action="store_true", help="one layer's FFN experts: dense, routed, one FFN on all tokens")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.shapes or args.profile or args.ffn:
        from monovl.train import memory_shapes

        if args.shapes:
            return memory_shapes.main(args)
        return memory_shapes.profile_main(args) if args.profile else memory_shapes.ffn_main(args)
    if args.child:
        print(json.dumps(measure(args.child, args.preset, args.layers, args.batch, args.seq_len, args.steps,
                                 args.device, args.ac)))
        return 0
    rows, forwarded = {}, sys.argv[1:] if argv is None else list(argv)
    for stage in ("s1.1", "full"):
        cmd = [sys.executable, "-m", "monovl.train.memory", "--child", stage, *forwarded]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)
            return 1
        rows[stage] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{args.preset}, {args.layers or 'all'} layers, batch {args.batch} x {args.seq_len} tokens, {args.device}, "
          f"activation checkpointing {'on' if args.ac else 'off'}")
    for name, stage in (("delta (S1.1)", "s1.1"), ("full", "full")):
        r = rows[stage]
        print(f"{name:13s} trainable {r['trainable'] / 1e6:8.1f} M of {r['params'] / 1e6:.1f} M | "
              f"{r['tokens_per_s']:9.1f} tokens/s | peak memory {r['peak_bytes'] / 2**30:6.2f} GiB")
    ratio = rows["s1.1"]["peak_bytes"] / rows["full"]["peak_bytes"]
    print(f"delta / full peak memory: {ratio:.2f} (target <= 0.6)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
