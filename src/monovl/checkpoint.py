"""Read and write checkpoints in the release format (config.json + single or sharded safetensors).

Loading builds the model on the meta device and materialises one tensor at a time from the memory-mapped
files, cast to the target dtype, so two full copies of the weights never coexist.
"""
from __future__ import annotations

import json
import logging
import os
import re
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
FLOAT_STORAGE = ("F", "BF")  # safetensors dtype names of floating-point tensors (F16, F32, F64, BF16, F8_*)
_LAYER = re.compile(r"\.layers\.(\d+)\.")
LLM_PREFIX = "language_model."  # a plain LLM checkpoint (InternLM2, Qwen, Llama) stores `language_model.*` without it


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the problem."""


SHIPPED_MODEL = Path(__file__).resolve().parent / "assets" / "tiny"  # trained by `monovl demo --reproduce`
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def parse_device(name: str | torch.device | None) -> torch.device:
    """`name` ("cpu", "cuda", "cuda:1", …; None: cpu) as a device this machine has, else a ValueError saying why."""
    try:
        device = torch.device(name or "cpu")
    except (RuntimeError, TypeError):
        raise ValueError(f"device {name!r} is not a torch device (cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device.index is not None and device.index >= count or count == 0:
            raise ValueError(f"device {name!r}: this machine has {count} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r}: MPS is not available on this machine")
    return device


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


def _read_json(file: Path, what: str):
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{file} is not a text file ({what} must be JSON)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {file}: {e.strerror or e}") from None


def read_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a checkpoint folder; a CheckpointError naming the file and field otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint folder")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json")
    raw = _read_json(path / "config.json", "config.json")
    try:
        cfg = from_hf_config(raw)
    except KeyError as e:
        raise CheckpointError(f"{path}/config.json lacks the field {e}") from None
    except (ValueError, TypeError) as e:  # from_hf_config names the field
        raise CheckpointError(f"{path}/config.json: {e}") from None
    gen = path / "generation_config.json"
    cfg.generation = _read_json(gen, "generation_config.json") if gen.exists() else None
    if cfg.generation is not None and not isinstance(cfg.generation, dict):
        raise CheckpointError(f"{gen} must hold a JSON object, not {type(cfg.generation).__name__}")
    return cfg


def _weight_files(path: Path) -> list[Path]:
    if (path / INDEX).exists():
        weight_map = _read_json(path / INDEX, INDEX)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{path / INDEX} has no weight_map of tensor names to file names")
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{path}: shard file(s) listed in {INDEX} are missing: {', '.join(missing)}")
        return files
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    raise CheckpointError(f"{path} has no model.safetensors or {INDEX} (only safetensors weights are read)")


def _file_key(cfg: ModelConfig, name: str) -> str:
    """Our parameter name → the name stored in the checkpoint."""
    return name[len(LLM_PREFIX):] if cfg.vision is None else name


def _open(file: Path):
    try:
        return safe_open(file, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for corrupt or truncated files
        raise CheckpointError(f"{file} is not a readable safetensors file: {e}") from None


def _meta_model(cfg: ModelConfig, backend: str = "int8pack", dtype: torch.dtype = torch.float32
                ) -> tuple[MonoInternVL, dict[str, str], set[str]]:
    """The model `cfg` describes, on the meta device (with empty int8 modules when `cfg` says the checkpoint is
    quantized); {file key: our name} of the tensors to read; the keys of a tied head that a file may hold too
    (an equal copy)."""
    with torch.device("meta"):
        model = MonoInternVL(cfg)
    if cfg.quantization is not None:
        quant.empty_quantized(model, cfg.quantization, backend, dtype)
    tied = cfg.llm.tie_word_embeddings and cfg.quantization is None
    return model, _expected_tensors(model), {_file_key(cfg, f"{LLM_PREFIX}{n}.weight")
                                             for n in ("lm_head", "output") if tied}


def _expected_tensors(model: MonoInternVL) -> dict[str, str]:
    """File key → our name, for the parameters and the int8 modules' tensors (weight, weight_scale, bias)."""
    cfg = model.cfg
    names = [n for n, _ in model.named_parameters()]  # a tied head is not listed
    for m in quant.quantized_names(model):
        module = model.get_submodule(m)
        names += [f"{m}.{a}" for a in ("weight", "weight_scale", "bias") if getattr(module, a, None) is not None]
    return {_file_key(cfg, n): n for n in names}


_STORAGE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                  "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _int8_part(model: MonoInternVL, name: str) -> str | None:
    """"weight" or "weight_scale" when `name` is one of an int8 module's quantized tensors, else None."""
    module_name, _, attr = name.rpartition(".")
    if attr in ("weight", "weight_scale") and isinstance(model.get_submodule(module_name), quant.QUANT_MODULES):
        return attr
    return None


def _scan(path: Path, cfg: ModelConfig, model, params: dict[str, str], tied_head: set[str]):
    """Headers only: ({file: [keys to load]}, what is wrong as message parts). Every tensor must be floating-point,
    except the int8 weights of a checkpoint that config.json says is int8-quantized (each with its float scale)."""
    plan, wrong, bad_dtype, not_float, unexpected, keys = {}, [], [], [], [], set()
    for file in _weight_files(path):
        plan[file] = []
        with _open(file) as f:
            for key in f.keys():
                keys.add(key)
                if key not in params:
                    if key not in tied_head:
                        unexpected.append(key)
                    continue
                piece = f.get_slice(key)
                module_name, _, attr = params[key].rpartition(".")
                want = tuple(getattr(model.get_submodule(module_name), attr).shape)
                got, stored = tuple(piece.get_shape()), piece.get_dtype()
                is_float = stored.startswith(FLOAT_STORAGE)
                part = _int8_part(model, params[key])
                if got != want:
                    wrong.append(f"{key}: shape {got} in {file.name}, expected {want}")
                elif part == "weight" and stored != "I8":
                    bad_dtype.append(f"{key}: dtype {_STORAGE_NAMES.get(stored, stored)} in {file.name}, "
                                     "expected int8")
                elif part == "weight_scale" and not is_float:
                    bad_dtype.append(f"{key}: dtype {_STORAGE_NAMES.get(stored, stored)} in {file.name}, "
                                     "expected a float scale")
                elif part != "weight" and not is_float:
                    not_float.append(f"{key} ({stored})")
                else:
                    plan[file].append(key)
    missing = sorted(set(params) - keys)
    parts = [f"wrong shape: {'; '.join(wrong)}"] if wrong else []
    parts += [f"wrong dtype: {'; '.join(bad_dtype)}"] if bad_dtype else []
    parts += [f"not floating-point weights (integer tensors are only read as the int8 weights of a checkpoint "
              f"whose config.json says it is int8-quantized): {_some(not_float)}"] if not_float else []
    parts += [f"missing key(s): {_some(missing)}"] if missing else []
    parts += [f"unexpected key(s): {_some(unexpected)}"] if unexpected else []
    if parts:
        parts[-1] += _hint(cfg, keys, missing, unexpected)
    return plan, parts


def _some(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (" …" if len(keys) > n else "")


def check_weights(path, cfg: ModelConfig | None = None) -> str:
    """Read the safetensors headers only: "" when every tensor `cfg` (default: the folder's config.json) needs
    is present, readable, floating-point (int8 weights with their scales for an int8-quantized checkpoint) and
    of the right shape, else what is wrong."""
    path = Path(path)
    cfg = cfg or read_config(path)
    return "; ".join(_scan(path, cfg, *_meta_model(cfg))[1])


def _layers(keys) -> set[int]:
    return {int(m.group(1)) for k in keys if (m := _LAYER.search(k))}


def _hint(cfg: ModelConfig, keys: set[str], missing: list[str], unexpected: list[str]) -> str:
    return _structure_hint(cfg, keys, missing, [k for k in unexpected if not k.endswith(".weight_scale")]) + \
        _quant_hint(cfg, missing, unexpected)


def _structure_hint(cfg: ModelConfig, keys: set[str], missing: list[str], unexpected: list[str]) -> str:
    field = "llm_config." if cfg.vision is not None else ""
    stored = _layers(keys)
    if stored and len(stored) != cfg.llm.num_hidden_layers:
        return (f" — the weights hold {len(stored)} decoder layers but {field}num_hidden_layers is "
                f"{cfg.llm.num_hidden_layers} in config.json: the config and the weights are of different models")
    attention_expert = (".attention_ve.", ".self_attn_ve.")
    if cfg.llm.visual_attention_experts and any(e in k for k in missing for e in attention_expert):
        return (" — config.json enables visual_attention_experts (v1.5) but the weights have no attention_ve.*; "
                f"set {field}visual_attention_experts to false for a v1 checkpoint")
    if any(e in k for k in unexpected for e in attention_expert):
        return (" — the weights carry attention experts (attention_ve.*, Mono-InternVL-1.5) but config.json does "
                f"not enable them; set {field}visual_attention_experts to true")
    return ""


def _quant_hint(cfg: ModelConfig, missing: list[str], unexpected: list[str]) -> str:
    if cfg.quantization is None and any(k.endswith(".weight_scale") for k in unexpected):
        return " — the weights carry int8 scales (*.weight_scale) but config.json has no quantization_config"
    if cfg.quantization is not None and any(k.endswith(".weight_scale") for k in missing):
        return (f" — config.json says the weights are {cfg.quantization} but the files lack their scales "
                "(*.weight_scale): a float checkpoint with a copied config?")
    return ""


def _image_token_id(path: Path) -> int:
    from monovl.tokenizer import Tokenizer
    try:
        tokenizer = Tokenizer.from_dir(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the tokenizer of {path}, which a model with images needs for the "
                              f"id of <IMG_CONTEXT>: {e} (Python API: load_model(..., image_token_id=ID))") from None
    if tokenizer.img_context_id is None:
        raise CheckpointError(f"the tokenizer in {path} has no <IMG_CONTEXT> token, which a model with images "
                              "needs (Python API: load_model(..., image_token_id=ID))")
    return tokenizer.img_context_id


def load_model(path, *, dtype: torch.dtype | None = None, device=None, image_token_id: int | None = None,
               quantize: str | None = None):
    """Load a release-format folder (InternVLChatModel), or a plain LLM folder (InternLM2/Qwen2/Qwen3/Llama
    *ForCausalLM) as the text part. Names, shapes and dtypes are checked from the headers before any tensor is
    read; a float tensor holding NaN or inf (stored, or after the cast to `dtype`) is refused.
    `quantize="int8"`: weight-only int8 (`monovl.model.quant`); a checkpoint saved quantized loads quantized as
    its config.json says (asking for another quantization is an error)."""
    if quantize is not None and quantize not in quant.METHODS:
        raise ValueError(f"unknown quantization {quantize!r} (known: {', '.join(quant.METHODS)})")
    path = Path(path)
    cfg = read_config(path)
    if cfg.quantization is not None and quantize not in (None, cfg.quantization):
        raise CheckpointError(f"{path} is stored quantized ({cfg.quantization}); it cannot load as {quantize!r}")
    device = parse_device(device)
    dtype = dtype or default_dtype(device)
    if image_token_id is None and cfg.vision is not None:
        image_token_id = _image_token_id(path)
    cfg.image_token_id = image_token_id
    model, params, tied_head = _meta_model(cfg, quant.pick_backend(device), dtype)
    plan, parts = _scan(path, cfg, model, params, tied_head)
    if parts:
        raise CheckpointError(f"{path}: " + "; ".join(parts))
    stored_bad, cast_bad, int8 = [], [], {}
    for file, keys in plan.items():
        with _open(file) as f:
            for key in keys:
                name = params[key]
                stored = f.get_tensor(key)
                part = _int8_part(model, name)
                if part == "weight":  # int8: no NaN or inf to look for
                    int8.setdefault(name.rpartition(".")[0], {})[part] = stored.to(device=device)
                    continue
                tensor = stored.to(device=device, dtype=torch.float32 if part else dtype)
                if not bool(torch.isfinite(tensor).all()):
                    (stored_bad if not bool(torch.isfinite(stored).all()) else cast_bad).append(key)
                if part:
                    int8.setdefault(name.rpartition(".")[0], {})[part] = tensor
                else:
                    _assign(model, name, tensor)
    if stored_bad:
        raise CheckpointError(f"{path}: the weights hold NaN or inf values in {len(stored_bad)} tensor(s): "
                              f"{_some(stored_bad)} — the checkpoint is damaged")
    if cast_bad:
        raise CheckpointError(f"{path}: {len(cast_bad)} tensor(s) overflow {_dtype_name(dtype)} (inf after the "
                              f"cast): {_some(cast_bad)} — load them as bfloat16 or float32")
    for module_name, tensors in int8.items():
        model.get_submodule(module_name).set_int8(tensors["weight"], tensors["weight_scale"])
    model.language_model.tie_weights()
    log.info("loaded %s (%s, %d tensors, %s%s)", path, cfg.architecture, len(params), dtype,
             f", {cfg.quantization}" * bool(cfg.quantization))
    if quantize is not None and cfg.quantization is None:
        quant.quantize(model, quantize)
        cfg.quantization = quantize
    return model.eval()


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
