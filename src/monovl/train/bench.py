"""Training-step benchmark: tokens/s, peak memory and the loss path's share of a forward + loss + backward step
on the S1.1 shape (1 tile + a 32-token caption) and the S2 shape (1 tile + 256 text tokens, a 64-token answer),
for a chosen freeze stage, each way in a fresh process: the dense blend with logits at every position (what the
official model code computes), routed experts with logits at every position, and the loss now (logits only where
a label is; also chunked).

    python -m monovl.train.bench --stage s1.1 --shape s1.1 --layers 8
    python -m monovl.train.bench --stage full --shape s2 --layers 8

The same as `python -m monovl.train.memory --shapes`, whose other modes (`--profile`, `--ffn`, delta vs full
memory) it leaves out.
"""
from __future__ import annotations

import sys

from monovl.train import memory


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if {"--profile", "--ffn", "--child"} & set(args):
        raise SystemExit("monovl.train.bench measures the step shapes; use python -m monovl.train.memory for "
                         "--profile and --ffn")
    return memory.main(["--shapes", *args])


if __name__ == "__main__":
    sys.exit(main())
