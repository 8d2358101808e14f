"""`monovl serve`: the OpenAI-compatible server (`monovl.serve`) under uvicorn."""
from __future__ import annotations

import sys
from pathlib import Path

from monovl.commands import add_model_args


def cmd_serve(args) -> int:
    import torch
    import uvicorn

    from monovl import load
    from monovl.checkpoint import parse_dtype
    from monovl.serve.api import ServeConfig, create_app
    from monovl.serve.engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model, dtype=parse_dtype(args.dtype), device=args.device)
    max_len = args.max_len or min(model.cfg.llm.max_position_embeddings, 4096)
    engine = Engine(model, max_batch=args.max_batch, max_len=max_len, max_queue=args.max_queue,
                    prefill_chunk=args.prefill_chunk).start()
    cfg = ServeConfig(model_name=args.served_model_name or Path(args.model).resolve().name, api_key=args.api_key,
                      max_tiles=args.max_tiles, max_images=args.max_images, request_timeout=args.timeout,
                      max_body_bytes=int(args.max_body_mb * 2**20),
                      allowed_media_dir=Path(args.allowed_media_dir) if args.allowed_media_dir else None)
    print(f"serving {cfg.model_name!r} on http://{args.host}:{args.port}/v1 ({args.max_batch} slots x {max_len} "
          "tokens)", file=sys.stderr)
    try:
        uvicorn.run(create_app(engine, tokenizer, cfg), host=args.host, port=args.port, log_level="warning")
    finally:
        engine.shutdown()
    return 0


def register(subparsers) -> None:
    s = subparsers.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching")
    add_model_args(s, required=True)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=int, default=8000, help="port to listen on")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: no key)")
    s.add_argument("--served-model-name", help="the model id clients send (default: the folder's name)")
    s.add_argument("--max-batch", type=int, default=8, help="KV-cache slots = requests decoded together")
    s.add_argument("--max-len", type=int, help="context per slot (default: min(max positions, 4096))")
    s.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 429")
    s.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens prefilled per engine step")
    s.add_argument("--max-tiles", type=int, help="tile budget per image (default: the checkpoint's)")
    s.add_argument("--max-images", type=int, default=8, help="images per request")
    s.add_argument("--allowed-media-dir", help="allow local image paths below this folder (default: none)")
    s.add_argument("--timeout", type=float, default=300.0, help="per-request timeout in seconds")
    s.add_argument("--max-body-mb", type=float, default=64.0, help="larger request bodies are refused (413)")
    s.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest for tiny models; default: torch's)")
    s.set_defaults(func=cmd_serve)
