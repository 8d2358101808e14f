"""`monovl info`: architecture, parameter counts and tokenizer facts of a checkpoint; the weights' headers are
checked (every tensor present, readable, float, of the right shape), their values are not read."""
from __future__ import annotations

import sys


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def cmd_info(args) -> int:
    import torch

    from monovl.checkpoint import check_weights, read_config
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
    print(f"architecture      {cfg.architecture} ({kind}; LLM family {c.family})")
    print(f"decoder           {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} heads / "
          f"{c.num_key_value_heads} kv heads (head_dim {c.head_dim}), FFN {c.intermediate_size}, vocab {c.vocab_size}")
    print(f"rope              theta {c.rope_theta:g}, scaling {c.rope_scaling}, "
          f"max positions {c.max_position_embeddings}")
    if cfg.vision is not None:
        v = cfg.vision
        print(f"vision            {v.image_size}px tiles, patch {v.patch_size}, width {v.hidden_size}, pixel shuffle "
              f"{cfg.downsample_ratio} ({cfg.ps_version}) -> {cfg.num_image_token} tokens/tile, "
              f"tiles {cfg.min_dynamic_patch}..{cfg.max_dynamic_patch}, thumbnail {cfg.use_thumbnail}")
    print(f"parameters        {_count(total)} total, {_count(total - inactive)} active per text token")
    if cfg.quantization:
        print(f"quantization      {cfg.quantization} weight-only (decoder linears, head, embeddings; scales per row)")
    tok = Tokenizer.from_dir(args.model)
    print(f"tokenizer         {tok.vocab_size} tokens; bos {tok.bos_id}, eos {tok.eos_id}, pad {tok.pad_id}; "
          f"<img> {tok.token_to_id('<img>')}, </img> {tok.token_to_id('</img>')}, "
          f"<IMG_CONTEXT> {tok.token_to_id('<IMG_CONTEXT>')}; "
          f"stop ids {tok.stop_token_ids}")
    print(f"template          {cfg.template}")
    if problem := check_weights(args.model, cfg):  # headers only: names, shapes, dtypes, truncation
        print(f"error: {args.model}: {problem}", file=sys.stderr)
        return 2
    int8 = " (int8 weights with their scales)" * bool(cfg.quantization)
    print(f"weights           ok: every tensor present, float{int8}, with the shapes of config.json")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="architecture, parameter counts and tokenizer facts of a checkpoint")
    p.add_argument("--model", required=True, help="checkpoint folder")
    p.set_defaults(func=cmd_info)
