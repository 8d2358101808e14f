"""`monovl monolithize LLM_DIR OUT_DIR --vision PRESET [--attention-experts]`: a release-format monolithic checkpoint
from a plain InternLM2, Qwen2/2.5, Qwen3 or Llama folder (`monovl.train.monolithize`)."""
from __future__ import annotations


def cmd_monolithize(args) -> int:
    import torch

    from monovl import load
    from monovl.checkpoint import parse_dtype, save_model
    from monovl.checks import writable_dir
    from monovl.config import preset
    from monovl.train.monolithize import monolithize

    writable_dir(args.out_dir)  # before the LLM loads
    geometry = preset(args.vision)
    if geometry.vision is None:
        raise ValueError(f"preset {args.vision!r} has no vision part; choose one that has (e.g. tiny, "
                         "mono-internvl-2b)")
    llm, tokenizer = load(args.llm_dir, dtype=torch.float32)
    model, tokenizer = monolithize(llm, tokenizer, vision=geometry.vision, downsample_ratio=geometry.downsample_ratio,
                                   max_dynamic_patch=geometry.max_dynamic_patch,
                                   visual_attention_experts=args.attention_experts, seed=args.seed,
                                   expert_init=args.expert_init)
    save_model(model, args.out_dir, dtype=parse_dtype(args.dtype), tokenizer=tokenizer)
    c = model.cfg
    total = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out_dir}: {c.llm.family} LLM ({c.llm.num_hidden_layers} layers) + patch embedding "
          f"{c.vision.image_size}px/{c.vision.patch_size}, {c.num_image_token} tokens per tile, "
          f"{'attention + FFN' if c.llm.visual_attention_experts else 'FFN'} experts; {total / 1e6:.2f} M parameters; "
          f"template {c.template}")
    return 0


def register(subparsers) -> None:
    from monovl.commands import number

    p = subparsers.add_parser("monolithize", help="make a plain LLM folder (InternLM2, Qwen2/2.5, Qwen3, Llama) "
                              "monolithic")
    p.add_argument("llm_dir", help="Hugging Face folder of the LLM (config.json, safetensors, tokenizer files)")
    p.add_argument("out_dir", help="where to write the monolithic checkpoint")
    p.add_argument("--vision", default="mono-internvl-2b",
                   help="preset whose vision geometry (tile size, patch, width, pixel shuffle) the patch embedding "
                   "gets")
    p.add_argument("--attention-experts", action="store_true",
                   help="also add visual attention experts (Mono-InternVL-1.5 / EViP++)")
    from monovl.train.recipe import EXPERT_INITS

    p.add_argument("--expert-init", choices=EXPERT_INITS, default="text",
                   help="visual experts copied from the text ones (Mono-InternVL's way) or drawn at random")
    p.add_argument("--seed", type=number(int, -(2**63), 2**64 - 1), default=0,
                   help="seed of the patch embedding and mlp1 initialisation")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of the written weights (default: float32)")
    p.set_defaults(func=cmd_monolithize)
