"""Write tiny random checkpoints in the exact Mono-InternVL release format (design.md §2).

Written from the spec only, independently of `monovl.checkpoint` / `monovl.model`, so that tests can
check the real loader and model against `tests/reference.py` on files shaped like the release.

    info = write_spec_checkpoint(tmp_path / "ckpt", visual_attention_experts=True)
    info["state_dict"]      # {checkpoint key: fp32 tensor}, exactly the values written
    info["config"]          # the dict written to config.json
    info["image_token_id"]  # id of <IMG_CONTEXT>
"""

import copy
import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

# The nine tokens InternVL adds after the InternLM2 vocabulary, in id order (design.md §2).
INTERNVL_ADDED_TOKENS = (
    "<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>",
)
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
TOKENIZER_FILES = (
    "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.json",
)
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
_TRANSFORMERS_VERSION = "4.37.2"


def _deep_merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def _tokenizer_vocab(tokenizer_dir: Path) -> tuple[int, int]:
    """(vocab size, <IMG_CONTEXT> id) from a tokenizer folder: largest known id + 1."""
    ids: dict[str, int] = {}
    added = tokenizer_dir / "added_tokens.json"
    if added.exists():
        ids.update({tok: int(i) for tok, i in json.loads(added.read_text()).items()})
    tok_cfg = tokenizer_dir / "tokenizer_config.json"
    if tok_cfg.exists():
        decoder = json.loads(tok_cfg.read_text()).get("added_tokens_decoder", {})
        ids.update({entry["content"]: int(i) for i, entry in decoder.items()})
    size = max(ids.values()) + 1 if ids else 0
    sp_model = tokenizer_dir / "tokenizer.model"
    if sp_model.exists():
        try:
            import sentencepiece

            size = max(size, sentencepiece.SentencePieceProcessor(model_file=str(sp_model)).get_piece_size())
        except (ImportError, OSError, RuntimeError):
            pass
    if IMG_CONTEXT_TOKEN not in ids:
        raise ValueError(f"{tokenizer_dir} defines no {IMG_CONTEXT_TOKEN} token")
    return size, ids[IMG_CONTEXT_TOKEN]


def _build_config(*, hidden, layers, heads, kv_heads, intermediate, vocab, image_size, patch_size,
                  vision_hidden, downsample_ratio, ps_version, visual_attention_experts, rope_scaling,
                  rope_theta, dtype_name) -> dict:
    llm_config = {
        "_name_or_path": "monovl-spec-internlm2-ve",
        "architectures": ["InternLM2VEForCausalLM"],
        "attn_implementation": "eager",
        "auto_map": {
            "AutoConfig": "configuration_internlm2.InternLM2Config",
            "AutoModel": "modeling_internlm2_ve.InternLM2VEForCausalLM",
            "AutoModelForCausalLM": "modeling_internlm2_ve.InternLM2VEForCausalLM",
        },
        "bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "max_position_embeddings": 4096,
        "model_type": "internlm2",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "pad_token_id": 2,
        "rms_norm_eps": 1e-5,
        "rope_scaling": copy.deepcopy(rope_scaling),
        "rope_theta": rope_theta,
        "tie_word_embeddings": False,
        "torch_dtype": dtype_name,
        "transformers_version": _TRANSFORMERS_VERSION,
        "use_cache": True,
        "vocab_size": vocab,
        "monovl_spec_llm_extra": {"kept": True, "values": [1, 2, 3]},  # unknown: must survive a round trip
    }
    if visual_attention_experts:
        llm_config["visual_attention_experts"] = True
    vision_config = {
        "architectures": ["InternVisionPatchModel"],
        "model_type": "intern_vit_patch",
        "hidden_size": vision_hidden,
        "image_size": image_size,
        "patch_size": patch_size,
        "num_channels": 3,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "torch_dtype": dtype_name,
        "transformers_version": _TRANSFORMERS_VERSION,
        "monovl_spec_vision_extra": "kept",  # unknown: must survive a round trip
    }
    return {
        "_commit_hash": None,
        "architectures": ["InternVLChatModel"],
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
            "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
        },
        "downsample_ratio": downsample_ratio,
        "dynamic_image_size": True,
        "force_image_size": image_size,
        "llm_config": llm_config,
        "max_dynamic_patch": 6,
        "min_dynamic_patch": 1,
        "model_type": "internvl_chat",
        "ps_version": ps_version,
        "select_layer": -1,
        "template": "internlm2-chat",
        "torch_dtype": dtype_name,
        "transformers_version": _TRANSFORMERS_VERSION,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "use_thumbnail": True,
        "vision_config": vision_config,
        "monovl_spec_extra": {"note": "unknown field, kept on round trip", "nested": [1, {"k": "v"}]},
    }


def _random_weights(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """fp32 random weights for every key of §2, scaled so activations stay O(1)."""
    gen = torch.Generator().manual_seed(seed)
    # attention experts draw from their own stream: with or without them, the other weights are identical
    gen_attention_ve = torch.Generator().manual_seed(seed + 7919)

    def normal(*shape, std, generator=gen):
        return torch.randn(*shape, generator=generator) * std

    def norm_weight(n):
        return 1.0 + normal(n, std=0.1)

    vc, lc = config["vision_config"], config["llm_config"]
    c, p, s = vc["hidden_size"], vc["patch_size"], vc["image_size"]
    d, n_layers = lc["hidden_size"], lc["num_hidden_layers"]
    heads, kv_heads, inter, vocab = (lc["num_attention_heads"], lc["num_key_value_heads"],
                                     lc["intermediate_size"], lc["vocab_size"])
    hd = d // heads
    c4 = c * int(1 / config["downsample_ratio"]) ** 2
    qkv_rows = (heads + 2 * kv_heads) * hd  # = kv_heads * (n_rep + 2) * hd

    sd = {
        "vision_model.embeddings.class_embedding": normal(1, 1, c, std=0.5),
        "vision_model.embeddings.patch_embedding.weight": normal(c, 3, p, p, std=1 / math.sqrt(3 * p * p)),
        "vision_model.embeddings.patch_embedding.bias": normal(c, std=0.1),
        "vision_model.embeddings.position_embedding": normal(1, 1 + (s // p) ** 2, c, std=0.5),
        "mlp1.0.weight": norm_weight(c4),
        "mlp1.0.bias": normal(c4, std=0.1),
        "mlp1.1.weight": normal(d, c4, std=1 / math.sqrt(c4)),
        "mlp1.1.bias": normal(d, std=0.1),
        "mlp1.3.weight": normal(d, d, std=1 / math.sqrt(d)),
        "mlp1.3.bias": normal(d, std=0.1),
        "language_model.model.tok_embeddings.weight": normal(vocab, d, std=1.0),
        "language_model.model.norm.weight": norm_weight(d),
        "language_model.output.weight": normal(vocab, d, std=1 / math.sqrt(d)),
    }
    experts = ["attention", "feed_forward"]
    if lc.get("visual_attention_experts", False):
        experts.append("attention_ve")
    experts.append("feed_forward_ve")
    for i in range(n_layers):
        pre = f"language_model.model.layers.{i}."
        sd[pre + "attention_norm.weight"] = norm_weight(d)
        sd[pre + "ffn_norm.weight"] = norm_weight(d)
        for name in experts:
            # independent draws: the visual experts differ from the text ones, so routing bugs show
            if name.startswith("attention"):
                g = gen_attention_ve if name == "attention_ve" else gen
                sd[pre + name + ".wqkv.weight"] = normal(qkv_rows, d, std=1 / math.sqrt(d), generator=g)
                sd[pre + name + ".wo.weight"] = normal(d, heads * hd, std=0.5 / math.sqrt(heads * hd),
                                                       generator=g)
            else:
                sd[pre + name + ".w1.weight"] = normal(inter, d, std=1 / math.sqrt(d))
                sd[pre + name + ".w3.weight"] = normal(inter, d, std=1 / math.sqrt(d))
                sd[pre + name + ".w2.weight"] = normal(d, inter, std=0.5 / math.sqrt(inter))
    return sd


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], shard_bytes: int | None) -> None:
    if shard_bytes is None:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():  # greedy, in key order; a shard holds at least one tensor
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    n = len(shards)
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        weight_map.update({key: fname for key in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_spec_checkpoint(path, *, seed=0, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=96,
                          vocab=None, image_size=56, patch_size=14, vision_hidden=32, downsample_ratio=0.5,
                          ps_version="v2", visual_attention_experts=False, rope_scaling=None, rope_theta=1e6,
                          dtype=torch.bfloat16, shard_bytes=None, tokenizer_dir=None,
                          extra_config=None) -> dict:
    """Write a random Mono-InternVL checkpoint folder in the release format; see the module docstring.

    Returns {"path", "state_dict" (fp32 copies of the written tensors), "config", "image_token_id",
    "num_image_token" (tokens per tile), "added_tokens" ({token: id})}.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if hidden % heads or heads % kv_heads:
        raise ValueError("hidden must divide by heads, heads by kv_heads")
    k = round(1 / downsample_ratio)
    if image_size % patch_size or (image_size // patch_size) % k:
        raise ValueError("image_size / patch_size must be a whole grid divisible by 1/downsample_ratio")

    if tokenizer_dir is not None:
        tokenizer_dir = Path(tokenizer_dir)
        tok_vocab, image_token_id = _tokenizer_vocab(tokenizer_dir)
        if vocab is not None and vocab < tok_vocab:
            raise ValueError(f"vocab {vocab} smaller than the tokenizer's {tok_vocab}")
        vocab = vocab or tok_vocab
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).exists():
                shutil.copyfile(tokenizer_dir / name, path / name)
        added_tokens = json.loads((path / "added_tokens.json").read_text()) \
            if (path / "added_tokens.json").exists() else {IMG_CONTEXT_TOKEN: image_token_id}
    else:
        vocab = 128 if vocab is None else vocab
        if vocab < len(INTERNVL_ADDED_TOKENS) + 3:
            raise ValueError("vocab too small for <s>, </s> and the InternVL tokens")
        first = vocab - len(INTERNVL_ADDED_TOKENS)
        added_tokens = {tok: first + i for i, tok in enumerate(INTERNVL_ADDED_TOKENS)}
        (path / "added_tokens.json").write_text(json.dumps(added_tokens, indent=2) + "\n")
        image_token_id = added_tokens[IMG_CONTEXT_TOKEN]

    config = _build_config(
        hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, intermediate=intermediate, vocab=vocab,
        image_size=image_size, patch_size=patch_size, vision_hidden=vision_hidden,
        downsample_ratio=downsample_ratio, ps_version=ps_version,
        visual_attention_experts=visual_attention_experts, rope_scaling=rope_scaling, rope_theta=rope_theta,
        dtype_name=_DTYPE_NAMES[dtype],
    )
    if extra_config:
        _deep_merge(config, extra_config)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation_config = {
        "_from_model_config": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "transformers_version": _TRANSFORMERS_VERSION,
    }
    (path / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")

    written = {key: t.to(dtype).contiguous() for key, t in _random_weights(config, seed).items()}
    _write_safetensors(path, written, shard_bytes)
    grid = config["force_image_size"] // config["vision_config"]["patch_size"]
    return {
        "path": path,
        "state_dict": {key: t.float() for key, t in written.items()},
        "config": copy.deepcopy(config),
        "image_token_id": image_token_id,
        "num_image_token": int(grid * grid * config["downsample_ratio"] ** 2),
        "added_tokens": dict(added_tokens),
    }
