"""Read and write checkpoints in the release format (config.json + single or sharded safetensors).

Loading builds the model on the meta device and materialises one tensor at a time from the memory-mapped
files, cast to the target dtype, so two full copies of the weights never coexist.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from monovl.config import ModelConfig, from_hf_config, to_hf_config
from monovl.model import MonoInternVL
from monovl.model import quant

log = logging.getLogger(__name__)
INDEX = "model.safetensors.index.json"
LLM_PREFIX = "language_model."  # a plain LLM checkpoint (InternLM2, Qwen, Llama) stores `language_model.*` without it


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the problem."""


SHIPPED_MODEL = Path(__file__).resolve().parent / "assets" / "tiny"  # trained by `monovl demo --reproduce`
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def parse_dtype(name: str | None) -> torch.dtype | None:
    """A `DTYPES` name (e.g. "bf16") → torch dtype; None → None (the device's default)."""
    return DTYPES[name] if name else None


def model_dir(path: str | os.PathLike | None = None) -> Path:
    """`path`, or without one the tiny model shipped with monovl (see the README)."""
    if path is not None:
        return Path(path)
    if not (SHIPPED_MODEL / "config.json").is_file():
        raise FileNotFoundError(f"the shipped tiny model is missing from {SHIPPED_MODEL}; pass --model DIR, or "
                                "train it with `monovl demo --reproduce --out DIR` (then --model DIR/final)")
    return SHIPPED_MODEL


def read_config(path: str | os.PathLike) -> ModelConfig:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint folder")
    try:
        raw = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no config.json") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}/config.json is not valid JSON: {e}") from None
    try:
        cfg = from_hf_config(raw)
    except KeyError as e:
        raise CheckpointError(f"{path}/config.json lacks the field {e}") from None
    except ValueError as e:
        raise CheckpointError(f"{path}/config.json: {e}") from None
    gen = path / "generation_config.json"
    cfg.generation = json.loads(gen.read_text()) if gen.exists() else None
    return cfg


def _weight_files(path: Path) -> list[Path]:
    if (path / INDEX).exists():
        weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{path}: shard file(s) listed in {INDEX} are missing: {', '.join(missing)}")
        return files
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    raise CheckpointError(f"{path} has no model.safetensors or {INDEX} (only safetensors weights are read)")


def _file_key(cfg: ModelConfig, name: str) -> str:
    """Our parameter name → the name stored in the checkpoint."""
    return name[len(LLM_PREFIX):] if cfg.vision is None else name


def _expert_hint(cfg: ModelConfig, missing: list[str], unexpected: list[str]) -> str:
    attention_expert = (".attention_ve.", ".self_attn_ve.")
    if cfg.llm.visual_attention_experts and any(e in k for k in missing for e in attention_expert):
        return (" — config.json enables visual_attention_experts (v1.5) but the weights have no attention_ve.*; "
                "set llm_config.visual_attention_experts to false for a v1 checkpoint")
    if any(e in k for k in unexpected for e in attention_expert):
        return (" — the weights carry attention experts (attention_ve.*, Mono-InternVL-1.5) but config.json does "
                "not enable them; set llm_config.visual_attention_experts to true")
    return ""


def load_model(path, *, dtype: torch.dtype | None = None, device=None, image_token_id: int | None = None,
               quantize: str | None = None):
    """Load a release-format folder (InternVLChatModel), or a plain LLM folder (InternLM2/Qwen2/Qwen3/Llama
    *ForCausalLM) as the text part. `quantize="int8"`: weight-only int8 (`monovl.model.quant`); a checkpoint
    saved quantized loads quantized as its config.json says (asking for another quantization is an error)."""
    if quantize is not None and quantize not in quant.METHODS:
        raise ValueError(f"unknown quantization {quantize!r} (known: {', '.join(quant.METHODS)})")
    path = Path(path)
    cfg = read_config(path)
    if cfg.quantization is not None and quantize not in (None, cfg.quantization):
        raise CheckpointError(f"{path} is stored quantized ({cfg.quantization}); it cannot load as {quantize!r}")
    device = torch.device(device or "cpu")
    dtype = dtype or default_dtype(device)
    if image_token_id is None and cfg.vision is not None:
        from monovl.tokenizer import Tokenizer
        try:
            image_token_id = Tokenizer.from_dir(path).img_context_id
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read the <IMG_CONTEXT> id from the tokenizer in {path} ({e}); "
                                  "pass image_token_id") from None
    cfg.image_token_id = image_token_id
    with torch.device("meta"):
        model = MonoInternVL(cfg)
    if cfg.quantization is not None:
        quant.empty_quantized(model, cfg.quantization, quant.pick_backend(device), dtype)
    _read_weights(model, path, dtype, device)
    model.language_model.tie_weights()
    log.info("loaded %s (%s, %s%s)", path, cfg.architecture, dtype, f", {cfg.quantization}" * bool(cfg.quantization))
    if quantize is not None and cfg.quantization is None:
        quant.quantize(model, quantize)
        cfg.quantization = quantize
    return model.eval()


def _expected_tensors(model: MonoInternVL) -> dict[str, str]:
    """File key → our name, for the parameters and the int8 modules' tensors (weight, weight_scale, bias)."""
    cfg = model.cfg
    names = [n for n, _ in model.named_parameters()]  # a tied head is not listed
    for m in quant.quantized_names(model):
        module = model.get_submodule(m)
        names += [f"{m}.{a}" for a in ("weight", "weight_scale", "bias") if getattr(module, a, None) is not None]
    return {_file_key(cfg, n): n for n in names}


def _read_weights(model: MonoInternVL, path: Path, dtype: torch.dtype, device: torch.device) -> None:
    cfg = model.cfg
    params = _expected_tensors(model)
    quantized = set(quant.quantized_names(model))
    tied = cfg.llm.tie_word_embeddings and cfg.quantization is None
    tied_head = {_file_key(cfg, f"{LLM_PREFIX}{n}.weight") for n in ("lm_head", "output") if tied}
    seen, unexpected, problems, int8 = set(), [], [], {}
    for file in _weight_files(path):
        try:
            handle = safe_open(file, framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{file} is not a readable safetensors file: {e}") from None
        with handle as f:
            for key in f.keys():
                if key not in params:
                    if key not in tied_head:  # some tied checkpoints store the head's (equal) copy too
                        unexpected.append(key)
                    continue
                name = params[key]
                module_name, _, attr = name.rpartition(".")
                want = tuple(getattr(model.get_submodule(module_name), attr).shape)
                got = tuple(f.get_slice(key).get_shape())
                if got != want:
                    problems.append(f"{key}: shape {got} in {file.name}, expected {want}")
                    continue
                tensor = f.get_tensor(key)
                if module_name in quantized and attr != "bias":
                    if (tensor.dtype == torch.int8) != (attr == "weight"):
                        problems.append(f"{key}: dtype {_dtype_name(tensor.dtype)} in {file.name}, expected "
                                        f"{'int8' if attr == 'weight' else 'a float scale'}")
                        continue
                    int8.setdefault(module_name, {})[attr] = tensor.to(device=device, dtype=torch.int8
                                                                       if attr == "weight" else torch.float32)
                else:
                    _assign(model, name, tensor.to(device=device, dtype=dtype))
                seen.add(key)
    missing = sorted(set(params) - seen - {p.split(":")[0] for p in problems})
    if missing or unexpected or problems:
        raise CheckpointError(_mismatch(cfg, path, missing, unexpected, problems))
    for module_name, tensors in int8.items():
        model.get_submodule(module_name).set_int8(tensors["weight"], tensors["weight_scale"])


def _mismatch(cfg: ModelConfig, path: Path, missing: list[str], unexpected: list[str], problems: list[str]) -> str:
    parts = [f"wrong shape or dtype: {'; '.join(problems)}"] if problems else []
    parts += [f"missing key(s): {', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}"] if missing else []
    parts += [f"unexpected key(s): {', '.join(unexpected[:8])}{' …' if len(unexpected) > 8 else ''}"] \
        if unexpected else []
    hint = _expert_hint(cfg, missing, [k for k in unexpected if not k.endswith(".weight_scale")])
    if cfg.quantization is None and any(k.endswith(".weight_scale") for k in unexpected):
        hint += " — the weights carry int8 scales (*.weight_scale) but config.json has no quantization_config"
    elif cfg.quantization is not None and any(k.endswith(".weight_scale") for k in missing):
        hint += (f" — config.json says the weights are {cfg.quantization} but the files lack their scales "
                 "(*.weight_scale): a float checkpoint with a copied config?")
    return f"{path}: " + "; ".join(parts) + hint


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._buffers:
        setattr(module, attr, tensor)
    else:
        setattr(module, attr, nn.Parameter(tensor, requires_grad=False))


def _int8_tensors(model: MonoInternVL) -> dict[str, torch.Tensor]:
    """File key → tensor of each int8 module: `weight` (N, K) int8, `weight_scale` (N,) fp32, `bias` (in float)."""
    out = {}
    for m in quant.quantized_names(model):
        module = model.get_submodule(m)
        out[_file_key(model.cfg, f"{m}.weight")] = module.int8_weight()
        out[_file_key(model.cfg, f"{m}.weight_scale")] = module.weight_scale
        if getattr(module, "bias", None) is not None:
            out[_file_key(model.cfg, f"{m}.bias")] = module.bias
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_model(model: MonoInternVL, path, *, dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30,
               tokenizer=None) -> None:
    """Write `model` in the release format; above `max_shard_bytes` the weights are sharded with an index."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    tensors = {_file_key(cfg, n): p.detach() for n, p in model.named_parameters()}
    dtype = dtype or next(iter(tensors.values())).dtype
    kept = _int8_tensors(model)  # stored as they are: int8 weights, fp32 scales
    tensors.update(kept)
    shards, size = [[]], 0
    for key, t in tensors.items():
        nbytes = t.numel() * (t.dtype if key in kept else dtype).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, keys in zip(names, shards):
        part = {k: tensors[k].to(device="cpu", dtype=None if k in kept else dtype).contiguous() for k in keys}
        save_file(part, str(path / name), metadata={"format": "pt"})
    if len(shards) > 1:
        total = sum(t.numel() * (t.dtype if k in kept else dtype).itemsize for k, t in tensors.items())
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: name for name, keys in zip(names, shards) for k in keys}}
        (path / INDEX).write_text(json.dumps(index, indent=2))
    elif (path / INDEX).exists():
        (path / INDEX).unlink()
    hf = to_hf_config(cfg, torch_dtype=_dtype_name(dtype))
    gen = cfg.generation or {
        "bos_token_id": cfg.llm.bos_token_id, "eos_token_id": cfg.llm.eos_token_id,
        "pad_token_id": cfg.llm.pad_token_id}
    (path / "config.json").write_text(json.dumps(hf, indent=2, ensure_ascii=False))
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
    if tokenizer is not None:
        tokenizer.save(path)
