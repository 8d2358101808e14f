"""Time a forward + loss + backward step of the official Mono-InternVL model code, for `python -m monovl.train.bench
--official-code DIR --official-python PY`.

Run by that interpreter as a plain script (it never imports monovl, whose dependencies the official code's pinned
environment may not have): the official `InternVLChatModel` from the `internvl` package under DIR, built from the
`config.json` dict that monovl writes for the same geometry, random weights (the time does not depend on them),
trainable parameters chosen by monovl's freeze patterns, the same batch; one JSON line with the median step time
and the FLOPs of a step.

    PY official_step.py DIR CONFIG.json BATCH.pt PATTERNS.json STEPS
"""
import contextlib
import fnmatch
import json
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode


def main(code: str, config: str, batch_file: str, patterns_file: str, steps: int) -> dict:
    sys.path.insert(0, code)
    from internvl.model.internvl_chat import InternVLChatConfig, InternVLChatModel

    hf = json.load(open(config))
    torch.manual_seed(0)
    model = InternVLChatModel(InternVLChatConfig(**hf)).float().train()
    model.img_context_token_id = hf["img_context_token_id"]
    patterns = json.load(open(patterns_file))
    for name, p in model.named_parameters():
        p.requires_grad_(any(fnmatch.fnmatchcase(name, pat) for pat in patterns))
    b = torch.load(batch_file)
    ids = b["input_ids"]
    inputs = {"pixel_values": b["pixel_values"], "input_ids": ids, "attention_mask": torch.ones_like(ids),
              "image_flags": torch.ones(b["pixel_values"].shape[0], 1, dtype=torch.long), "labels": b["labels"]}
    times, counter = [], FlopCounterMode(display=False)  # its attention is eager (matmuls): counted as they are
    for i in range(steps + 1):  # the first step (allocation, warm-up; FLOPs counted) is not timed
        t0 = time.perf_counter()
        with counter if i == 0 else contextlib.nullcontext():
            model(**inputs).loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times[1:]), "tokens": ids.numel(), "flops": counter.get_total_flops(),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:5], int(sys.argv[5]))))
