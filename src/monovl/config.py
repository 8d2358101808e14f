"""Model configuration: dataclasses, named presets, and the Hugging Face `config.json` mapping.

`from_hf_config` / `to_hf_config` are the only places that know Hugging Face field names. The original
dict is kept in `ModelConfig.hf` so a load → save round trip preserves every field, unknown ones too.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

SUPPORTED_ARCHITECTURES = ("InternVLChatModel", "InternLM2ForCausalLM", "InternLM2VEForCausalLM", "Qwen2ForCausalLM",
                           "Qwen3ForCausalLM", "LlamaForCausalLM")
# LLM family → (architecture, model_type) of its Hugging Face config; "internlm2" also has InternLM2VEForCausalLM.
FAMILIES = {"internlm2": ("InternLM2ForCausalLM", "internlm2"), "qwen2": ("Qwen2ForCausalLM", "qwen2"),
            "qwen3": ("Qwen3ForCausalLM", "qwen3"), "llama": ("LlamaForCausalLM", "llama")}
_FAMILY_OF = {arch: family for family, (arch, _) in FAMILIES.items()}
TOKENIZER_TEMPLATE = "tokenizer"  # `ModelConfig.template`: the tokenizer's own chat template (Qwen, Llama)


@dataclass
class VisionConfig:
    image_size: int = 448  # tile side in pixels
    patch_size: int = 14
    hidden_size: int = 1024  # C, the patch-embedding width (1024 gives the stated 3.11 B total; unconfirmed)


@dataclass
class LLMConfig:
    # One name per concept, and the least renaming: every size keeps the name config.json gives it (Hugging Face:
    # `num_hidden_layers`, `num_attention_heads`, `num_key_value_heads` like `hidden_size`, `intermediate_size`).
    vocab_size: int = 92553
    hidden_size: int = 2048
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    intermediate_size: int = 8192
    rope_theta: float = 1e6
    rope_scaling: dict | None = None  # {"type": "linear" | "dynamic", "factor": f}, or {"rope_type": "llama3", …}
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    bias: bool = False  # InternLM2: a bias on every projection
    family: str = "internlm2"  # a FAMILIES key: which layout and parameter names the decoder uses
    qkv_bias: bool = False  # q/k/v projection biases (Qwen2; Llama/Qwen3 `attention_bias`); InternLM2 uses `bias`
    o_bias: bool = False  # output-projection bias (Llama/Qwen3 `attention_bias`)
    mlp_bias: bool = False  # Llama `mlp_bias`
    qk_norm: bool = False  # Qwen3: per-head RMSNorm of q and k before RoPE
    tie_word_embeddings: bool = False  # the output head shares the token-embedding matrix
    explicit_head_dim: int | None = None  # `head_dim` when config.json declares one (Qwen3, Llama 3)
    visual_ffn_experts: bool = True  # False for a plain InternLM2 LLM
    visual_attention_experts: bool = False  # Mono-InternVL-1.5 attention experts
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 2

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden_size // self.num_attention_heads


@dataclass
class ModelConfig:
    llm: LLMConfig = field(default_factory=LLMConfig)
    vision: VisionConfig | None = field(default_factory=VisionConfig)  # None: a text-only LLM
    downsample_ratio: float = 0.5
    ps_version: str = "v2"
    template: str = "internlm2-chat"  # or TOKENIZER_TEMPLATE
    dynamic_image_size: bool = True
    use_thumbnail: bool = True
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    image_token_id: int | None = None  # id of <IMG_CONTEXT>; read from the tokenizer files on load
    hf: dict = field(default_factory=dict, repr=False)  # the config.json this came from, if any
    generation: dict | None = field(default=None, repr=False)  # generation_config.json, if any
    quantization: str | None = None  # "int8": the weights are stored quantized (`monovl.model.quant`)

    @property
    def num_image_token(self) -> int:
        """Tokens per tile: (S / patch)² · downsample_ratio²; 0 for a text-only model."""
        if self.vision is None:
            return 0
        grid = self.vision.image_size // self.vision.patch_size
        return int(grid * grid * self.downsample_ratio**2)

    @property
    def architecture(self) -> str:
        return "InternVLChatModel" if self.vision is not None else FAMILIES[self.llm.family][0]


def _debug() -> ModelConfig:
    return ModelConfig(
        llm=LLMConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=4096),
        vision=VisionConfig(image_size=56, patch_size=14, hidden_size=32),
        max_dynamic_patch=6,
    )


def _tiny() -> ModelConfig:
    """The shipped tiny model: a small InternLM2 with visual FFN experts (its recipes add attention experts when
    they monolithize it); 112-px tiles, patch 7, pixel shuffle 0.5 → 64 tokens per tile, one tile per picture (the
    shipped model's S1.3 and S2 went on with up to three tiles and the thumbnail; its config says so). With
    16 tokens per tile (patch 14) its visual path could not learn a shape's kind (README: perception). The patch
    embedding is wide (768 channels): with 64, a 300-step frozen-LLM S1.2 probe learnt half as much from the image
    (shuffled-image loss gap 0.030 vs 0.063). `vocab_size` is a stand-in: set it from the tokenizer
    (`preset("tiny", vocab_size=…)`)."""
    return ModelConfig(
        llm=LLMConfig(vocab_size=1024, hidden_size=192, num_hidden_layers=4, num_attention_heads=6,
                      num_key_value_heads=2, intermediate_size=512, rope_theta=10000.0, max_position_embeddings=2048),
        vision=VisionConfig(image_size=112, patch_size=7, hidden_size=768),
        max_dynamic_patch=1,
    )


def _tiny_llm() -> ModelConfig:
    """Stage 0 of the tiny model: the same LLM as `tiny`, plain (no vision, no visual experts)."""
    cfg = _tiny()
    cfg.vision = None
    cfg.llm.visual_ffn_experts = False
    return cfg


def _mono_internvl_2b() -> ModelConfig:
    return ModelConfig()


def _mono_internvl_15_2b() -> ModelConfig:
    cfg = ModelConfig()
    cfg.llm.visual_attention_experts = True
    return cfg


PRESETS = {"debug": _debug, "tiny": _tiny, "tiny-llm": _tiny_llm, "mono-internvl-2b": _mono_internvl_2b,
           "mono-internvl-1.5-2b": _mono_internvl_15_2b}


def preset(name: str, **llm_overrides) -> ModelConfig:
    """A named preset; keyword arguments override `LLMConfig` fields (e.g. num_hidden_layers=4)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    cfg.llm = dataclasses.replace(cfg.llm, **llm_overrides)
    return cfg


def _rope_from_hf(d: dict) -> tuple[float, dict | None]:
    """(rope θ, scaling) from `rope_theta` + `rope_scaling`, or from `rope_parameters` (newer files)."""
    params = d.get("rope_parameters")
    if params is None:
        return float(d.get("rope_theta", 10000.0)), d.get("rope_scaling")
    params = dict(params)
    theta = float(params.pop("rope_theta", d.get("rope_theta", 10000.0)))
    return theta, params if params.get("rope_type", params.get("type", "default")) != "default" else None


def _family_fields(d: dict, family: str) -> dict:
    """The fields in which the Llama-style families differ (biases, q/k norm, head_dim, tied output)."""
    if family == "internlm2":
        return {}
    if d.get("use_sliding_window"):
        raise ValueError("sliding-window attention (use_sliding_window: true) is not supported")
    attention_bias = bool(d.get("attention_bias", False))
    return dict(qkv_bias=True if family == "qwen2" else attention_bias, o_bias=family != "qwen2" and attention_bias,
                mlp_bias=bool(d.get("mlp_bias", False)), qk_norm=family == "qwen3",
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), explicit_head_dim=d.get("head_dim"))


def _token_id(value, default):
    """A token id field; a list (Llama 3 lists several EOS ids) gives its first entry."""
    if isinstance(value, list):
        return value[0] if value else default
    return default if value is None else value


def _table(d, where: str) -> dict:
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be a JSON object ({{...}}), not {type(d).__name__}")
    return d


def _whole(d: dict, key: str, where: str, *, required: bool = True, low: int = 1):
    """d[key] if it is an integer >= low (absent and not required: None), else a ValueError naming the field."""
    if key not in d or d[key] is None:
        if required:
            raise ValueError(f"lacks the field {where}{key}")
        return None
    value = d[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{where}{key} = {value!r}: must be an integer >= {low}")
    return value


def _check_llm_fields(d: dict, where: str) -> None:
    """The sizes the decoder is built from: positive integers that divide as attention needs."""
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        _whole(d, key, where)
    heads, kv = d["num_attention_heads"], _whole(d, "num_key_value_heads", where, required=False)
    if kv is not None and heads % kv:
        raise ValueError(f"{where}num_attention_heads = {heads} is not a multiple of "
                         f"{where}num_key_value_heads = {kv}")
    head_dim = _whole(d, "head_dim", where, required=False)
    if head_dim is None and d["hidden_size"] % heads:
        raise ValueError(f"{where}hidden_size = {d['hidden_size']} is not a multiple of "
                         f"{where}num_attention_heads = {heads}")
    for key in ("rope_theta", "rms_norm_eps"):
        value = d.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
                                  or value == float("inf")):
            raise ValueError(f"{where}{key} = {value!r}: must be a positive number")


def _check_vision_fields(d: dict, v: dict) -> None:
    for key in ("hidden_size", "patch_size", "image_size"):
        _whole(v, key, "vision_config.", required=key == "hidden_size")
    for key in ("force_image_size", "min_dynamic_patch", "max_dynamic_patch"):
        _whole(d, key, "", required=False)
    image_size = d.get("force_image_size") or v.get("image_size", 448)
    if image_size % v.get("patch_size", 14):
        raise ValueError(f"the image size {image_size} is not a multiple of vision_config.patch_size "
                         f"{v.get('patch_size', 14)}")
    ratio = d.get("downsample_ratio", 0.5)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1 or (1 / ratio) % 1:
        raise ValueError(f"downsample_ratio = {ratio!r}: must be 1/n for a whole n (Mono-InternVL: 0.5)")
    if d.get("min_dynamic_patch", 1) > d.get("max_dynamic_patch", 12):
        raise ValueError(f"min_dynamic_patch = {d.get('min_dynamic_patch', 1)} is above max_dynamic_patch = "
                         f"{d.get('max_dynamic_patch', 12)}")


_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "intermediate_size")  # the LLM's sizes: the same names in config.json and in LLMConfig


def _llm_from_hf(d: dict, *, family: str, visual_ffn_experts: bool, where: str = "") -> LLMConfig:
    _check_llm_fields(d, where)
    theta, scaling = _rope_from_hf(d)
    return LLMConfig(
        **{k: d[k] for k in _SIZES if k != "num_key_value_heads"},
        num_key_value_heads=d.get("num_key_value_heads", d["num_attention_heads"]), rope_theta=theta,
        rope_scaling=scaling, max_position_embeddings=d.get("max_position_embeddings", 2048),
        rms_norm_eps=d.get("rms_norm_eps", 1e-6), bias=bool(d.get("bias", False)), family=family,
        **_family_fields(d, family), visual_ffn_experts=visual_ffn_experts,
        visual_attention_experts=bool(d.get("visual_attention_experts", False)),
        bos_token_id=_token_id(d.get("bos_token_id"), 1), eos_token_id=_token_id(d.get("eos_token_id"), 2),
        pad_token_id=_token_id(d.get("pad_token_id"), 2),
    )


def _architecture(d: dict, key: str, default: str = "<none>") -> str:
    archs = d.get(key.rpartition(".")[2]) or [default]
    if not isinstance(archs, list) or not isinstance(archs[0], str):
        raise ValueError(f"{key} = {archs!r}: must be a list of architecture names")
    return archs[0]


def _llm_family(arch: str) -> str:
    return "internlm2" if arch == "InternLM2VEForCausalLM" else _FAMILY_OF[arch]


QUANT_METHOD = "monovl-int8"  # `quantization_config.quant_method` of checkpoints written quantized


def from_hf_config(d: dict) -> ModelConfig:
    """Map a Hugging Face `config.json` dict (InternVLChatModel or a supported *ForCausalLM) to a ModelConfig;
    a missing, mistyped or impossible field is a ValueError that names it."""
    cfg = _from_hf_config(d)
    q = d.get("quantization_config")
    if q is not None:
        if not isinstance(q, dict) or q.get("quant_method") != QUANT_METHOD or q.get("bits") != 8:
            raise ValueError(f"quantization_config {q!r} is not one monovl reads (quant_method {QUANT_METHOD!r}, "
                             "bits 8)")
        cfg.quantization = "int8"
    return cfg


def _from_hf_config(d: dict) -> ModelConfig:
    arch = _architecture(_table(d, "the file"), "architectures")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch!r} in config.json; monovl supports "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    if arch != "InternVLChatModel":
        llm = _llm_from_hf(d, family=_llm_family(arch), visual_ffn_experts=arch == "InternLM2VEForCausalLM")
        template = "internlm2-chat" if llm.family == "internlm2" else TOKENIZER_TEMPLATE
        return ModelConfig(llm=llm, vision=None, template=template, hf=copy.deepcopy(d))
    for key in ("vision_config", "llm_config"):
        if key not in d:
            raise ValueError(f"lacks the field {key}")
    v, llm = _table(d["vision_config"], "vision_config"), _table(d["llm_config"], "llm_config")
    llm_arch = _architecture(llm, "llm_config.architectures", "InternLM2VEForCausalLM")
    if llm_arch not in SUPPORTED_ARCHITECTURES[2:]:
        raise ValueError(f"unsupported llm_config architecture {llm_arch!r}: monovl runs monolithic checkpoints "
                         f"whose LLM is one of {', '.join(SUPPORTED_ARCHITECTURES[2:])}")
    _check_vision_fields(d, v)
    image_size = d.get("force_image_size") or v.get("image_size", 448)
    return ModelConfig(
        llm=_llm_from_hf(llm, family=_llm_family(llm_arch), visual_ffn_experts=True, where="llm_config."),
        vision=VisionConfig(image_size=image_size, patch_size=v.get("patch_size", 14), hidden_size=v["hidden_size"]),
        downsample_ratio=d.get("downsample_ratio", 0.5), ps_version=d.get("ps_version", "v2"),
        template=d.get("template", "internlm2-chat"), dynamic_image_size=d.get("dynamic_image_size", True),
        use_thumbnail=d.get("use_thumbnail", True), min_dynamic_patch=d.get("min_dynamic_patch", 1),
        max_dynamic_patch=d.get("max_dynamic_patch", 12), hf=copy.deepcopy(d),
    )


def _llm_to_hf(c: LLMConfig, base: dict, arch: str) -> dict:
    d = dict(base)
    if c.family != "internlm2":
        return _family_llm_to_hf(c, d)
    d.update(architectures=[arch], model_type="internlm2", **{k: getattr(c, k) for k in _SIZES},
             rope_theta=c.rope_theta, rope_scaling=c.rope_scaling,
             max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps, bias=c.bias,
             hidden_act="silu", tie_word_embeddings=False, bos_token_id=c.bos_token_id,
             eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)
    if c.visual_attention_experts or "visual_attention_experts" in d:
        d["visual_attention_experts"] = c.visual_attention_experts
    return d


def _family_llm_to_hf(c: LLMConfig, d: dict) -> dict:
    """A Qwen/Llama config: the source file's fields (rope, token ids, …) kept; sizes and expert flags set."""
    arch, model_type = FAMILIES[c.family]
    d.update(architectures=[arch], model_type=model_type, **{k: getattr(c, k) for k in _SIZES},
             rms_norm_eps=c.rms_norm_eps, hidden_act="silu",
             tie_word_embeddings=c.tie_word_embeddings)
    if c.explicit_head_dim is not None:
        d["head_dim"] = c.explicit_head_dim
    if "rope_parameters" not in d:
        d.update(rope_theta=c.rope_theta, rope_scaling=c.rope_scaling)
    if c.visual_attention_experts or "visual_attention_experts" in d:
        d["visual_attention_experts"] = c.visual_attention_experts
    return d


def to_hf_config(cfg: ModelConfig, torch_dtype: str | None = None) -> dict:
    """The `config.json` dict: the original fields, updated with this config's values."""
    d = copy.deepcopy(cfg.hf)
    d.pop("quantization_config", None)
    if cfg.quantization is not None:
        d["quantization_config"] = {"quant_method": QUANT_METHOD, "bits": 8, "symmetric": True,
                                    "granularity": "per_output_channel", "scales": "<name>.weight_scale"}
    if cfg.vision is None:
        arch = "InternLM2VEForCausalLM" if cfg.llm.visual_ffn_experts else cfg.architecture
        d = _llm_to_hf(cfg.llm, d, arch)
        if torch_dtype:
            d["torch_dtype"] = torch_dtype
        return d
    llm = _llm_to_hf(cfg.llm, d.get("llm_config", {}), "InternLM2VEForCausalLM")  # others: their own name
    vision = dict(d.get("vision_config", {}))
    vision.update(model_type="intern_vit_patch", architectures=["InternVisionPatchModel"],
                  image_size=cfg.vision.image_size, patch_size=cfg.vision.patch_size,
                  hidden_size=cfg.vision.hidden_size, num_channels=3)
    if torch_dtype:
        llm["torch_dtype"] = vision["torch_dtype"] = d["torch_dtype"] = torch_dtype
    d.update(architectures=["InternVLChatModel"], model_type="internvl_chat", llm_config=llm,
             vision_config=vision, force_image_size=cfg.vision.image_size, downsample_ratio=cfg.downsample_ratio,
             ps_version=cfg.ps_version, select_layer=-1, template=cfg.template,
             dynamic_image_size=cfg.dynamic_image_size, use_thumbnail=cfg.use_thumbnail,
             min_dynamic_patch=cfg.min_dynamic_patch, max_dynamic_patch=cfg.max_dynamic_patch)
    return d
