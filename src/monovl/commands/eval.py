"""`monovl eval`: score a checkpoint, or saved predictions, on benchmark TSVs (`monovl.eval`)."""
from __future__ import annotations

from pathlib import Path


def _judge(args, bench):
    if not args.judge_url:
        return None
    from monovl.eval.judge import Judge

    return Judge(args.judge_url, args.judge_model, args.judge_key, cache=Path(args.out) / f"{bench.name}.judge.jsonl")


def _check_inputs(args) -> list:
    """Every input, read or checked before a model loads: the flags that go together, the output folder, the
    benchmark TSVs (read here, once) and the predictions files."""
    from monovl.checks import writable_dir
    from monovl.eval.benchmarks import load_benchmark

    if args.judge_url and not args.judge_model:
        raise ValueError("--judge-url needs --judge-model")
    if args.predictions and len(args.predictions) != len(args.bench):
        raise ValueError("give one --predictions file per --bench file")
    if not args.predictions and not args.model:
        raise ValueError("give --model (to run a checkpoint) or --predictions (to re-score)")
    missing = [p for p in args.predictions or [] if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"no such predictions file: {', '.join(missing)}")
    writable_dir(args.out)
    return [load_benchmark(b, args.kind) for b in args.bench]


def _runs(args, benches):
    """(benchmark, a function that scores it) for each --bench."""
    common = dict(out_dir=args.out, kind=args.kind, limit=args.limit, circular=args.circular, seed=args.seed)
    if args.predictions:
        from monovl.eval.predictions import rescore

        return [(b, lambda b=b, p=p: rescore(b, p, judge=_judge(args, b), **common))
                for b, p in zip(benches, args.predictions)]
    from monovl import load
    from monovl.checkpoint import parse_dtype
    from monovl.eval.run import evaluate

    model, tokenizer = load(args.model, dtype=parse_dtype(args.dtype), device=args.device, quantize=args.quantize)
    return [(b, lambda b=b: evaluate(model, tokenizer, b, judge=_judge(args, b), batch_size=args.batch_size,
                                     max_tiles=args.max_tiles, max_new_tokens=args.max_new_tokens, **common))
            for b in benches]


def cmd_eval(args) -> int:
    from monovl.eval.run import format_markdown

    for _, run in _runs(args, _check_inputs(args)):
        results = run()
        print(format_markdown(results))
        print(f"wrote {Path(args.out) / results['benchmark']}.{{predictions.jsonl,results.json,results.md}}")
    return 0


def register(subparsers) -> None:
    from monovl.commands import add_model_args, number
    from monovl.eval.benchmarks import BENCHMARK_KINDS
    from monovl.eval.run import DEFAULT_OUT

    e = subparsers.add_parser("eval", help="evaluate a checkpoint (or saved predictions) on VLMEvalKit-format TSVs")
    add_model_args(e, default_help="checkpoint folder (needed unless --predictions is given)")
    e.add_argument("--bench", nargs="+", required=True, metavar="FILE.tsv", help="benchmark TSV file(s)")
    e.add_argument("--predictions", nargs="+", metavar="FILE",
                   help="score these predictions (.jsonl / VLMEvalKit .xlsx or .tsv, one per --bench) without a model")
    e.add_argument("--out", default=DEFAULT_OUT, help=f"folder for predictions and results (default: {DEFAULT_OUT})")
    e.add_argument("--kind", choices=BENCHMARK_KINDS,
                   help="scoring rule (default: from the benchmark's name as VLMEvalKit does, else the columns)")
    e.add_argument("--batch-size", type=number(int, 1), default=8, help="questions generated together")
    e.add_argument("--max-tiles", type=number(int, 1), default=6, help="tile budget per image")
    e.add_argument("--max-new-tokens", type=number(int, 1), help="answer budget (default: by kind, 32 to 128)")
    e.add_argument("--limit", type=number(int, 1),
                   help="a seeded sample of N questions, stratified by category (default: all)")
    e.add_argument("--seed", type=number(int), default=0, help="seed of the --limit sample")
    e.add_argument("--circular", action="store_true", help="CircularEval: every rotation of the options")
    e.add_argument("--judge-url", help="OpenAI-compatible endpoint (e.g. http://127.0.0.1:8000/v1) of an LLM "
                                       "judge for answers exact matching cannot read (default: off)")
    e.add_argument("--judge-model", help="the judge's model name")
    e.add_argument("--judge-key", help="the judge's API key (default: none)")
    e.set_defaults(func=cmd_eval)
