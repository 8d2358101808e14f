"""The `monovl` command line: chat, info, bench, serve, loadtest."""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

import torch

from monovl.world import register as register_world
from monovl.demo import register as register_demo
from monovl.eval.run import register as register_eval
from monovl.train.recipe import register as register_train
from monovl.train.metrics import register as register_plot

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def _dtype(name: str | None):
    return DTYPES[name] if name else None


def default_model_dir() -> Path:
    """The model `monovl chat` / `monovl demo` run without --model: the tiny model shipped with monovl, trained
    from scratch on the synthetic world by `monovl demo --reproduce` (see the README)."""
    from monovl.demo import SHIPPED_MODEL

    if not (SHIPPED_MODEL / "config.json").is_file():
        raise FileNotFoundError(f"the shipped tiny model is missing from {SHIPPED_MODEL}; pass --model DIR, or "
                                "train it with `monovl demo --reproduce --out DIR` (then --model DIR/final)")
    return SHIPPED_MODEL


def _generation_kwargs(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)


def _answer(conv, question: str, images: list[str], gen: dict) -> None:
    for piece in conv.stream(question, images, **gen):
        print(piece, end="", flush=True)
    print()


def cmd_chat(args) -> int:
    from monovl import load
    from monovl.chat import Conversation

    model, tokenizer = load(args.model or default_model_dir(), dtype=_dtype(args.dtype), device=args.device)
    conv = Conversation(model, tokenizer, system=args.system, max_tiles=args.max_tiles)
    gen = _generation_kwargs(args)
    if args.prompt is not None:
        _answer(conv, args.prompt, args.image, gen)
        return 0
    print("monovl chat: type a message; '/image PATH' attaches an image to your next message, "
          "'/reset' starts over, '/exit' or Ctrl-D quits.", file=sys.stderr)
    pending = list(args.image)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            conv = Conversation(model, tokenizer, system=args.system, max_tiles=args.max_tiles)
            pending = []
            continue
        if line.startswith("/image"):
            pending += shlex.split(line[len("/image"):])
            print(f"(attached: {', '.join(pending)})", file=sys.stderr)
            continue
        if not line:
            continue
        print("assistant> ", end="", flush=True)
        try:
            _answer(conv, line, pending, gen)
        except ValueError as e:  # a bad image or prompt: say so and keep the session
            print(f"\nerror: {e}", file=sys.stderr)
        pending = []


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def cmd_info(args) -> int:
    from monovl.checkpoint import read_config
    from monovl.model import MonoInternVL
    from monovl.tokenizer import Tokenizer

    with torch.device("meta"):  # shapes only: counting needs no weights
        model = MonoInternVL(read_config(args.model))
    cfg, c = model.cfg, model.cfg.llm
    total = sum(p.numel() for p in model.parameters())
    inactive = sum(p.numel() for n, p in model.named_parameters()
                   if "_ve." in n or n.startswith(("vision_model.", "mlp1.")))
    kind = ("Mono-InternVL-1.5: attention + FFN visual experts" if c.visual_attention_experts
            else "FFN visual experts" if c.visual_ffn_experts else "text LLM")
    print(f"architecture      {cfg.architecture} ({kind})")
    print(f"decoder           {c.num_layers} layers, hidden {c.hidden_size}, {c.num_heads} heads / {c.num_kv_heads} "
          f"kv heads (head_dim {c.head_dim}), FFN {c.intermediate_size}, vocab {c.vocab_size}")
    print(f"rope              theta {c.rope_theta:g}, scaling {c.rope_scaling}, "
          f"max positions {c.max_position_embeddings}")
    if cfg.vision is not None:
        v = cfg.vision
        print(f"vision            {v.image_size}px tiles, patch {v.patch_size}, width {v.hidden_size}, pixel shuffle "
              f"{cfg.downsample_ratio} ({cfg.ps_version}) -> {cfg.num_image_token} tokens/tile, "
              f"tiles {cfg.min_dynamic_patch}..{cfg.max_dynamic_patch}, thumbnail {cfg.use_thumbnail}")
    print(f"parameters        {_count(total)} total, {_count(total - inactive)} active per text token")
    tok = Tokenizer.from_dir(args.model)
    print(f"tokenizer         {tok.vocab_size} tokens; bos {tok.bos_id}, eos {tok.eos_id}, pad {tok.pad_id}; "
          f"<img> {tok.img_start_id}, </img> {tok.img_end_id}, <IMG_CONTEXT> {tok.img_context_id}; "
          f"stop ids {tok.stop_token_ids}")
    print(f"template          {cfg.template}")
    return 0


def cmd_bench(args) -> int:
    from monovl import bench
    from monovl.checkpoint import load_model
    from monovl.config import preset
    from monovl.scratch import new_model

    device = torch.device(args.device)
    dtype = _dtype(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.model:
        model = load_model(args.model, dtype=dtype, device=device)
    else:
        overrides = {"num_layers": args.layers} if args.layers else {}
        cfg = preset(args.preset, **overrides)
        cfg.image_token_id = cfg.llm.vocab_size - 7
        model = new_model(cfg).to(device=device, dtype=dtype)
    c = model.cfg.llm
    print(f"model: {args.model or args.preset}, {c.num_layers} layers, hidden {c.hidden_size}, {dtype}, {device}, "
          f"{torch.get_num_threads()} threads")
    peak = bench.gemm_peak_gflops(dtype=dtype, device=device)
    bw = bench.copy_bandwidth_gbs(device=device)
    print(f"machine: GEMM peak {peak:.1f} GFLOP/s (2048³ {dtype} matmul), copy bandwidth {bw:.1f} GB/s "
          "(read + write)")
    r = bench.run_bench(model, tiles=args.tiles, text_tokens=args.text_tokens, decode_tokens=args.decode_tokens,
                        repeat=args.repeat, dense=not args.no_dense)
    print(f"prompt: {r['tokens']} tokens ({r['visual_tokens']} visual, {args.tiles} tile(s))")
    print(f"TTFT {r['ttft_s'] * 1e3:.1f} ms | prefill {r['prefill_tok_s']:.1f} tok/s, "
          f"{r['prefill_gflops']:.1f} GFLOP/s = {r['prefill_gflops'] / peak:.0%} of GEMM peak")
    print(f"decode {r['decode_tok_s']:.2f} tok/s, {r['decode_gbs']:.1f} GB/s = {r['decode_gbs'] / bw:.0%} of the "
          f"bandwidth roofline")
    if not args.no_dense:
        print(f"dense blend (official route) TTFT {r['dense_ttft_s'] * 1e3:.1f} ms, {r['dense_gflops']:.1f} GFLOP/s | "
              f"routed is {r['dense_over_routed']:.2f}x faster")
    return 0


def cmd_serve(args) -> int:
    import uvicorn

    from monovl import load
    from monovl.serve.api import ServeConfig, create_app
    from monovl.serve.engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model, dtype=_dtype(args.dtype), device=args.device)
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


def cmd_loadtest(args) -> int:
    from monovl.loadtest import format_report, run_loadtest

    report = run_loadtest(args.url, clients=args.clients, requests=args.requests, max_tokens=args.max_tokens,
                          model=args.model, api_key=args.api_key, time_limit=args.time_limit)
    print(format_report(report))
    return 0 if report["failed"] == 0 else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="monovl", description="Monolithic multimodal LLMs (Mono-InternVL family)")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("chat", help="chat with a checkpoint (one answer with --prompt, else interactive)")
    c.add_argument("--model", help="checkpoint folder (default: the shipped tiny model, see README)")
    c.add_argument("--image", action="append", default=[], help="image file for the first message (repeatable)")
    c.add_argument("--prompt", help="answer this one message and exit")
    c.add_argument("--system", help="system message (default: the template's)")
    c.add_argument("--max-tiles", type=int, help="tile budget per image (default: the checkpoint's)")
    c.add_argument("--max-new-tokens", type=int, default=512)
    c.add_argument("--temperature", type=float, default=0.0)
    c.add_argument("--top-p", type=float, default=1.0)
    c.add_argument("--top-k", type=int, default=0)
    c.add_argument("--repetition-penalty", type=float, default=1.0)
    c.add_argument("--seed", type=int)
    c.add_argument("--dtype", choices=sorted(DTYPES))
    c.add_argument("--device")
    c.set_defaults(func=cmd_chat)

    info = sub.add_parser("info", help="architecture, parameter counts and tokenizer facts of a checkpoint")
    info.add_argument("--model", required=True)
    info.set_defaults(func=cmd_info)

    b = sub.add_parser("bench", help="prefill/decode speed vs this machine's GEMM peak and bandwidth")
    b.add_argument("--model", help="a checkpoint folder (default: random weights of --preset)")
    b.add_argument("--preset", default="mono-internvl-2b")
    b.add_argument("--layers", type=int, help="override the number of decoder layers")
    b.add_argument("--tiles", type=int, default=1)
    b.add_argument("--text-tokens", type=int, default=32)
    b.add_argument("--decode-tokens", type=int, default=16)
    b.add_argument("--repeat", type=int, default=3, help="interleaved rounds; the best of each route counts")
    b.add_argument("--dtype", choices=sorted(DTYPES))
    b.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    b.add_argument("--no-dense", action="store_true", help="skip the dense-blend comparison")
    b.set_defaults(func=cmd_bench)

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching")
    s.add_argument("--model", required=True, help="checkpoint folder")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY'")
    s.add_argument("--served-model-name", help="the model id clients send (default: the folder's name)")
    s.add_argument("--max-batch", type=int, default=8, help="KV-cache slots = requests decoded together")
    s.add_argument("--max-len", type=int, help="context per slot (default: min(max positions, 4096))")
    s.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 429")
    s.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens prefilled per engine step")
    s.add_argument("--max-tiles", type=int, help="tile budget per image (default: the checkpoint's)")
    s.add_argument("--max-images", type=int, default=8, help="images per request")
    s.add_argument("--allowed-media-dir", help="allow local image paths below this folder")
    s.add_argument("--timeout", type=float, default=300.0, help="per-request timeout in seconds")
    s.add_argument("--max-body-mb", type=float, default=64.0, help="larger request bodies are refused (413)")
    s.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest for tiny models)")
    s.add_argument("--dtype", choices=sorted(DTYPES))
    s.add_argument("--device")
    s.set_defaults(func=cmd_serve)

    lt = sub.add_parser("loadtest", help="N concurrent streaming clients against a local server")
    lt.add_argument("--url", default="http://127.0.0.1:8000/v1")
    lt.add_argument("--clients", type=int, default=8)
    lt.add_argument("--requests", type=int, default=32, help="requests in all (at most 10000)")
    lt.add_argument("--max-tokens", type=int, default=64)
    lt.add_argument("--model", help="model id (default: the server's first)")
    lt.add_argument("--api-key")
    lt.add_argument("--time-limit", type=float, default=300.0, help="stop after this many seconds")
    lt.set_defaults(func=cmd_loadtest)
    register_world(sub)
    register_demo(sub)
    register_eval(sub)
    register_train(sub)
    register_plot(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # CheckpointError, ImageError and bad arguments
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
