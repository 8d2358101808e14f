"""`monovl loadtest`: concurrent streaming clients against a running `monovl serve` (`monovl.loadtest`)."""
from __future__ import annotations


def cmd_loadtest(args) -> int:
    from monovl.loadtest import format_report, run_loadtest

    report = run_loadtest(args.url, clients=args.clients, requests=args.requests, max_tokens=args.max_tokens,
                          model=args.model, api_key=args.api_key, time_limit=args.time_limit)
    print(format_report(report))
    return 0 if report["failed"] == 0 else 1


def register(subparsers) -> None:
    from monovl.commands import number

    lt = subparsers.add_parser("loadtest", help="N concurrent streaming clients against a local server")
    lt.add_argument("--url", default="http://127.0.0.1:8000/v1", help="the server's OpenAI base URL")
    lt.add_argument("--clients", type=number(int, 1, 256), default=8, help="concurrent clients")
    lt.add_argument("--requests", type=number(int, 1, 10000), default=32, help="requests in all (at most 10000)")
    lt.add_argument("--max-tokens", type=number(int, 1), default=64, help="tokens per answer")
    lt.add_argument("--model", help="model id (default: the server's first)")
    lt.add_argument("--api-key", help="bearer key (default: none)")
    lt.add_argument("--time-limit", type=number(float, 0, low_open=True), default=300.0,
                    help="stop after this many seconds")
    lt.set_defaults(func=cmd_loadtest)
