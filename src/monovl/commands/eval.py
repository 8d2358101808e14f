"""`monovl eval`: score a checkpoint on benchmark TSVs (`monovl.eval`)."""
from __future__ import annotations

from pathlib import Path

from monovl.commands import add_model_args


def cmd_eval(args) -> int:
    from monovl import load
    from monovl.checkpoint import parse_dtype
    from monovl.eval.run import evaluate, format_markdown

    model, tokenizer = load(args.model, dtype=parse_dtype(args.dtype), device=args.device)
    for bench_path in args.bench:
        results = evaluate(model, tokenizer, bench_path, out_dir=args.out, kind=args.kind,
                           batch_size=args.batch_size, max_tiles=args.max_tiles, max_new_tokens=args.max_new_tokens,
                           limit=args.limit, circular=args.circular)
        print(format_markdown(results))
        print(f"wrote {Path(args.out) / results['benchmark']}.{{predictions.jsonl,results.json,results.md}}")
    return 0


def register(subparsers) -> None:
    from monovl.eval.benchmarks import BENCHMARK_KINDS

    e = subparsers.add_parser("eval", help="evaluate a checkpoint on VLMEvalKit-format benchmark TSVs")
    add_model_args(e, required=True)
    e.add_argument("--bench", nargs="+", required=True, metavar="FILE.tsv", help="benchmark TSV file(s)")
    e.add_argument("--out", default="eval_results", help="folder for predictions and results")
    e.add_argument("--kind", choices=BENCHMARK_KINDS, help="scoring rule (default: inferred from the columns)")
    e.add_argument("--batch-size", type=int, default=8, help="questions generated together")
    e.add_argument("--max-tiles", type=int, default=6, help="tile budget per image")
    e.add_argument("--max-new-tokens", type=int, help="answer budget (default: by kind, 32 to 128)")
    e.add_argument("--limit", type=int, help="only the first N questions of each benchmark (default: all)")
    e.add_argument("--circular", action="store_true", help="CircularEval: every rotation of the options")
    e.set_defaults(func=cmd_eval)
