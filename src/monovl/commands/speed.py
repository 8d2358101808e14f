"""`monovl bench`: prefill/decode speed of a checkpoint or a preset's geometry (`monovl.speed`)."""
from __future__ import annotations

import json

from monovl.commands import add_model_args, number


def _load(args, device, dtype):
    from monovl.checkpoint import load_model
    from monovl.config import preset
    from monovl.scratch import random_model

    if args.model:
        return load_model(args.model, dtype=dtype, device=device)
    cfg = preset(args.preset, **({"num_hidden_layers": args.layers} if args.layers else {}))
    return random_model(cfg).to(device=device, dtype=dtype)


def _print(r: dict, peak: float, bw: float, args) -> None:
    print(f"prompt: {r['tokens']} tokens ({r['visual_tokens']} visual, {args.tiles} tile(s))")
    print(f"TTFT {r['ttft_s'] * 1e3:.1f} ms | prefill {r['tokens'] / r['ttft_s']:.1f} tok/s, "
          f"{r['prefill_gflops']:.1f} GFLOP/s = {r['prefill_gflops'] / peak:.0%} of GEMM peak")
    print(f"decode {r['decode_tok_s']:.2f} tok/s, reads {r['decode_bytes'] / 1e9:.2f} GB/token = "
          f"{r['decode_gbs']:.1f} GB/s = {r['decode_gbs'] / bw:.0%} of the read-bandwidth roofline "
          f"({bw * 1e9 / r['decode_bytes']:.2f} tok/s)")
    print(f"turn 2 ({args.text_tokens} new tokens after the reused KV of turn 1) TTFT {r['turn2_ttft_s'] * 1e3:.1f} ms"
          f" = {r['turn2_ttft_s'] / r['ttft_s']:.2f}x turn 1")
    if "dense_ttft_s" in r:
        print(f"dense blend (official route) TTFT {r['dense_ttft_s'] * 1e3:.1f} ms, {r['dense_gflops']:.1f} GFLOP/s | "
              f"routed is {r['dense_over_routed']:.2f}x faster")
    if "modular_ttft_s" in r:
        print(f"modular (InternViT-300M-shaped encoder, 24 layers, width 1024, + the same LLM) TTFT "
              f"{r['modular_ttft_s'] * 1e3:.1f} ms | monolithic TTFT = {r['mono_over_modular']:.2f}x modular")
    if "decode_tok_s_int8" in r:
        print(f"int8 ({r['int8_backend']}): TTFT {r['ttft_s_int8'] * 1e3:.1f} ms, decode {r['decode_tok_s_int8']:.2f} "
              f"tok/s = {r['decode_tok_s_int8'] / r['decode_tok_s']:.2f}x fp32, {r['decode_gbs_int8']:.1f} GB/s = "
              f"{r['decode_gbs_int8'] / bw:.0%} of the roofline | weights {r['weights_gib_int8']:.2f} GiB = "
              f"{r['weights_gib_int8'] / r['weights_gib']:.2f}x | greedy token agreement "
              f"{r['int8_token_agreement']:.1%} of {args.agreement_tokens}")


def cmd_bench(args) -> int:
    import torch

    from monovl import speed
    from monovl.checkpoint import default_dtype, parse_device, parse_dtype
    from monovl.model import quant

    if args.threads:
        torch.set_num_threads(args.threads)
    device = parse_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = parse_dtype(args.dtype) or default_dtype(device)
    model = _load(args, device, dtype)
    c = model.cfg.llm
    print(f"model: {args.model or args.preset}, {c.num_hidden_layers} layers, hidden {c.hidden_size}, {dtype}, "
          f"{device}, {torch.get_num_threads()} threads")
    machine = speed.Machine(dtype=dtype, device=device)
    qmodel = quant.quantized_copy(model, args.quantize) if args.quantize else None
    encoder = None
    if args.modular:
        from monovl.model.vit import random_encoder
        encoder = random_encoder(model.cfg).to(device=device, dtype=dtype)
    r = speed.run_bench(model, tiles=args.tiles, text_tokens=args.text_tokens, decode_tokens=args.decode_tokens,
                        repeat=args.repeat, dense=not args.no_dense, quantized=qmodel, modular=encoder,
                        machine=machine)
    peak, bw = machine.gemm_peak_gflops, machine.bandwidth_gbs
    print(f"machine (best of the rounds): GEMM peak {peak:.1f} GFLOP/s (2048³ {dtype} matmul), read bandwidth "
          f"{bw:.1f} GB/s (streaming sum of 1 GiB)")
    if qmodel is not None:
        ids, pv = speed.bench_prompt(model, args.tiles, args.text_tokens)
        r.update(int8_backend=quant.pick_backend(device), weights_gib=quant.weight_bytes(model) / 2**30,
                 weights_gib_int8=quant.weight_bytes(qmodel) / 2**30,
                 int8_token_agreement=speed.token_agreement(model, qmodel, ids, pv, args.agreement_tokens))
    _print(r, peak, bw, args)
    if args.json:
        keys = {"ttft_s": "ttft_ms", "dense_ttft_s": "dense_ttft_ms", "turn2_ttft_s": "turn2_ttft_ms",
                "ttft_s_int8": "ttft_ms_int8",
                "modular_ttft_s": "modular_ttft_ms"}
        out = {keys.get(k, k): (v * 1e3 if k in keys else v) for k, v in r.items()
               if k not in ("decode_s", "decode_s_int8")}
        out.update(gemm_peak_gflops=peak, bandwidth_gbs=bw, decode_roofline_frac=r["decode_gbs"] / bw,
                   threads=torch.get_num_threads(), device=str(device), dtype=str(dtype).removeprefix("torch."))
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}))
    return 0


def register(subparsers) -> None:
    b = subparsers.add_parser("bench", help="prefill/decode speed vs this machine's GEMM peak and read bandwidth")
    add_model_args(b, default_help="a checkpoint folder (default: random weights of --preset)")
    b.add_argument("--preset", default="mono-internvl-2b", help="geometry of the random model")
    b.add_argument("--layers", type=number(int, 1), help="override the number of decoder layers")
    b.add_argument("--tiles", type=number(int, 0), default=1, help="image tiles in the prompt")
    b.add_argument("--text-tokens", type=number(int, 1), default=32, help="text tokens in the prompt (and in turn 2)")
    b.add_argument("--decode-tokens", type=number(int, 1), default=16, help="tokens decoded per round")
    b.add_argument("--repeat", type=number(int, 1), default=3, help="interleaved rounds; the best of each route counts")
    b.add_argument("--no-dense", action="store_true", help="skip the dense-blend comparison")
    b.add_argument("--agreement-tokens", type=number(int, 1), default=64,
                   help="with --quantize: greedy tokens over which int8 and the float model are compared")
    b.add_argument("--modular", action="store_true",
                   help="also time a modular MLLM's TTFT: an InternViT-300M-shaped encoder (random weights) before "
                        "the same LLM")
    b.add_argument("--threads", type=number(int, 1),
                   help="torch CPU threads (default: torch's; on a CPU shared with other work, 1 is steadier)")
    b.add_argument("--json", action="store_true", help="print every figure as one JSON object on the last line")
    b.set_defaults(func=cmd_bench)
