"""`monovl serve`: the OpenAI-compatible server (`monovl.serve`) and its chat page at /, under uvicorn."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from monovl.commands import add_model_args, number


def build_server(args):
    """(FastAPI app, started Engine, one line saying what is served) from the flags of `add_server_args`."""
    import torch

    from monovl import load
    from monovl.checkpoint import model_dir, parse_dtype
    from monovl.serve.api import ServeConfig, create_app
    from monovl.serve.engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model, dtype=parse_dtype(args.dtype), device=args.device, quantize=args.quantize)
    max_len = args.max_len or min(model.cfg.llm.max_position_embeddings, 4096)
    engine = Engine(model, max_batch=args.max_batch, max_len=max_len, max_queue=args.max_queue,
                    prefill_chunk=args.prefill_chunk, prefix_cache_bytes=int(args.prefix_cache_mb * 2**20)).start()
    cfg = ServeConfig(model_name=args.served_model_name or model_dir(args.model).resolve().name,
                      api_key=args.api_key, max_tiles=args.max_tiles, max_images=args.max_images,
                      request_timeout=args.timeout, max_body_bytes=int(args.max_body_mb * 2**20),
                      body_timeout=args.body_timeout, raw_special_tokens=args.raw_special_tokens,
                      allowed_media_dir=Path(args.allowed_media_dir) if args.allowed_media_dir else None)
    logging.getLogger("monovl.serve.access").setLevel(logging.WARNING if args.no_access_log else logging.INFO)
    what = f"{cfg.model_name!r} ({args.max_batch} slots x {max_len} tokens)"
    return create_app(engine, tokenizer, cfg), engine, what


def cmd_serve(args) -> int:
    import uvicorn

    from monovl.serve.http import protocol_with_header_timeout

    app, engine, what = build_server(args)
    print(f"serving {what} on http://{args.host}:{args.port}/v1, chat page at /", file=sys.stderr)
    try:  # uvicorn's own access log is off: ours has the same line plus tokens and latency
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                    http=protocol_with_header_timeout(args.header_timeout))
    finally:
        engine.shutdown()
    return 0


def add_server_args(s) -> None:
    """Every flag of the server but --model, --host and --port (`monovl serve` and `monovl web` share them)."""
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ (the page asks for it; "
                                     "default: no key)")
    s.add_argument("--served-model-name", help="the model id clients send (default: the folder's name)")
    s.add_argument("--max-batch", type=number(int, 1), default=8, help="KV-cache slots = requests decoded together")
    s.add_argument("--max-len", type=number(int, 2), help="context per slot (default: min(max positions, 4096))")
    s.add_argument("--max-queue", type=number(int, 1), default=64, help="waiting requests before answering 429")
    s.add_argument("--prefill-chunk", type=number(int, 1), default=512, help="prompt tokens prefilled per engine step")
    s.add_argument("--prefix-cache-mb", type=number(float, 0), default=1024.0,
                   help="memory for the keys and values of finished requests, reused by follow-up turns that start "
                        "with them (LRU; 0 turns it off)")
    s.add_argument("--max-tiles", type=number(int, 1), help="tile budget per image (default: the checkpoint's)")
    s.add_argument("--max-images", type=number(int, 0), default=8, help="images per request")
    s.add_argument("--allowed-media-dir", help="allow local image paths below this folder (default: none)")
    s.add_argument("--timeout", type=number(float, 0, low_open=True), default=300.0,
                   help="per-request timeout in seconds")
    s.add_argument("--max-body-mb", type=number(float, 0, low_open=True), default=64.0,
                   help="larger request bodies are refused (413), counted as they arrive (chunked too)")
    s.add_argument("--header-timeout", type=number(float, 0, low_open=True), default=10.0,
                   help="seconds for a request's line and headers to arrive before the connection is closed (408)")
    s.add_argument("--body-timeout", type=number(float, 0, low_open=True), default=30.0,
                   help="seconds without request body data before the request is refused (408)")
    s.add_argument("--raw-special-tokens", action="store_true",
                   help="tokenize special tokens typed in messages (<|im_end|>, ...) as control tokens; default: "
                        "they stay text (no role injection)")
    s.add_argument("--no-access-log", action="store_true",
                   help="do not log one line per request (method, path, status, tokens, latency)")
    s.add_argument("--threads", type=number(int, 1),
                   help="torch CPU threads (1 is fastest for tiny models; default: torch's)")


def register(subparsers) -> None:
    s = subparsers.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching")
    add_model_args(s, required=True)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=number(int, 0, 65535), default=8000, help="port to listen on")
    add_server_args(s)
    s.set_defaults(func=cmd_serve)
