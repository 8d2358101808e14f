"""`monovl bench`: prefill/decode speed of a checkpoint or a preset's geometry (`monovl.speed`)."""
from __future__ import annotations

from monovl.commands import add_model_args, number


def cmd_bench(args) -> int:
    import torch

    from monovl import speed
    from monovl.checkpoint import default_dtype, load_model, parse_device, parse_dtype
    from monovl.config import preset
    from monovl.scratch import random_model

    device = parse_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = parse_dtype(args.dtype) or default_dtype(device)
    if args.model:
        model = load_model(args.model, dtype=dtype, device=device)
    else:
        cfg = preset(args.preset, **({"num_layers": args.layers} if args.layers else {}))
        model = random_model(cfg).to(device=device, dtype=dtype)
    c = model.cfg.llm
    print(f"model: {args.model or args.preset}, {c.num_layers} layers, hidden {c.hidden_size}, {dtype}, {device}, "
          f"{torch.get_num_threads()} threads")
    peak = speed.gemm_peak_gflops(dtype=dtype, device=device)
    bw = speed.copy_bandwidth_gbs(device=device)
    print(f"machine: GEMM peak {peak:.1f} GFLOP/s (2048³ {dtype} matmul), copy bandwidth {bw:.1f} GB/s "
          "(read + write)")
    r = speed.run_bench(model, tiles=args.tiles, text_tokens=args.text_tokens, decode_tokens=args.decode_tokens,
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


def register(subparsers) -> None:
    b = subparsers.add_parser("bench", help="prefill/decode speed vs this machine's GEMM peak and bandwidth")
    add_model_args(b, default_help="a checkpoint folder (default: random weights of --preset)")
    b.add_argument("--preset", default="mono-internvl-2b", help="geometry of the random model")
    b.add_argument("--layers", type=number(int, 1), help="override the number of decoder layers")
    b.add_argument("--tiles", type=number(int, 0), default=1, help="image tiles in the prompt")
    b.add_argument("--text-tokens", type=number(int, 1), default=32, help="text tokens in the prompt")
    b.add_argument("--decode-tokens", type=number(int, 1), default=16, help="tokens decoded per round")
    b.add_argument("--repeat", type=number(int, 1), default=3, help="interleaved rounds; the best of each route counts")
    b.add_argument("--no-dense", action="store_true", help="skip the dense-blend comparison")
    b.set_defaults(func=cmd_bench)
