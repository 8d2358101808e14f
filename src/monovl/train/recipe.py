"""Training recipes: one dataclass per section, read from TOML, with dotted `section.key=value` overrides.

A recipe file has the sections `[model]`, `[data]`, `[optim]`, `[schedule]`, `[checkpoint]` and `[run]`;
every key is a field below. Unknown sections or keys are errors that name the key, so a typo never trains
with a silent default.
"""
import dataclasses
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path


EXPERT_INITS = ("text", "random")  # how monolithizing starts the visual experts (`monolithize(expert_init=…)`)


@dataclass
class ModelSection:
    path: str = ""  # release-format checkpoint to start from; empty = random weights of `preset`
    preset: str = "debug"  # without `path`: random weights of this preset; with a plain InternLM2 `path`: the
    # vision geometry (tile size, patch, width, pixel shuffle) of the patch embedding that monolithizing adds
    attention_experts: bool = False  # monolithizing a plain LLM: also add v1.5 attention experts (EViP++)
    expert_init: str = "text"  # monolithizing: visual experts copied from the text ones ("text") or "random"
    seed: int = 0  # random initialisation seed (without `path`)
    stage: str = "full"  # freeze stage: s1.1, s1.2, s1.3, s2, full (see monovl.train.freeze.STAGES)
    trainable: list[str] = field(default_factory=list)  # fnmatch patterns; non-empty overrides `stage`
    # LoRA on these linear modules (fnmatch), applied after the stage's freezing: their base weights freeze,
    # lora_A/lora_B train; merged into plain weights on export
    lora_targets: list[str] = field(default_factory=list)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    activation_checkpointing: bool = False  # recompute each decoder layer in the backward pass
    compile: bool = False  # torch.compile each decoder layer
    loss_chunk: int = 0  # > 0: logits of at most this many label tokens at a time (bounded memory, same loss)
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 parameters (fp32 reductions) on GPU


@dataclass
class DataSection:
    kind: str = "synthetic"  # "synthetic" (deterministic random samples, no files) or "mix" (the sources below)
    sources: list[dict] = field(default_factory=list)  # mix: [{kind, path, weight, root}] (train.data.SourceConfig)
    batch_size: int = 8  # global rows per micro step, over all processes
    seq_len: int = 64  # tokens per row
    seed: int = 0
    options: dict = field(default_factory=dict)  # mix: more train.data.DataConfig fields (pack, max_tiles, …)


@dataclass
class OptimSection:
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr × this
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.05
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    grad_accum: int = 1  # micro steps per optimizer step


@dataclass
class ScheduleSection:
    steps: int = 100  # optimizer steps in all
    warmup_steps: int = 10  # linear warmup from 0, then cosine


@dataclass
class CheckpointSection:
    every: int = 50  # save training state every N steps (0 = only at the end)
    keep_last: int = 2  # training states kept on disk
    export: bool = True  # write the final model in the release format to RUN_DIR/final


@dataclass
class RunSection:
    out_dir: str = "runs/debug"  # RUN_DIR: metrics, training states, final model
    seed: int = 0
    device: str = "auto"  # auto: cuda if available, else cpu
    resume: bool = True  # continue from the newest training state in RUN_DIR, if any
    log_every: int = 1
    max_consecutive_nonfinite: int = 5  # NaN/inf steps in a row before the run stops
    progress: bool = True  # tqdm progress bar on rank 0
    tensorboard: bool = True
    threads: int = 0  # torch CPU threads (0 = torch's default)
    fsdp: bool = True  # shard with FSDP2 when run under torchrun with several processes


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    run: RunSection = field(default_factory=RunSection)


def _section_types(cls) -> dict:
    return typing.get_type_hints(cls)


def _check_value(where: str, tp, value):
    """`value` converted to field type `tp`, or a ValueError naming `where`."""
    origin = typing.get_origin(tp) or tp
    if origin is bool:
        if isinstance(value, bool):
            return value
    elif origin is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif origin is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif origin in (str, list, dict):
        if isinstance(value, origin):
            return list(value) if origin is list else value
    raise ValueError(f"{where}: expected {getattr(origin, '__name__', origin)}, got {value!r}")


def from_dict(d: dict) -> TrainConfig:
    """A TrainConfig from nested dicts; unknown sections or keys raise a ValueError naming them."""
    cfg = TrainConfig()
    sections = _section_types(TrainConfig)
    for name, values in d.items():
        if name not in sections:
            raise ValueError(f"unknown recipe section [{name}]; sections are {sorted(sections)}")
        if not isinstance(values, dict):
            raise ValueError(f"recipe section [{name}] must be a table, got {values!r}")
        section = getattr(cfg, name)
        types = _section_types(type(section))
        for key, value in values.items():
            if key not in types:
                raise ValueError(f"unknown recipe key {name}.{key}; [{name}] has {sorted(types)}")
            setattr(section, key, _check_value(f"{name}.{key}", types[key], value))
    return cfg


def parse_override(text: str) -> tuple[str, str, object]:
    """`section.key=value` → (section, key, value typed by the field). Values are TOML (strings may be bare)."""
    dotted, sep, raw = text.partition("=")
    section, dot, key = dotted.strip().partition(".")
    if not sep or not dot or not key:
        raise ValueError(f"override {text!r} must look like section.key=value")
    sections = _section_types(TrainConfig)
    if section not in sections:
        raise ValueError(f"unknown recipe section in override {text!r}; sections are {sorted(sections)}")
    types = _section_types(sections[section])
    if key not in types:
        raise ValueError(f"unknown recipe key {section}.{key}; [{section}] has {sorted(types)}")
    tp = typing.get_origin(types[key]) or types[key]
    raw = raw.strip()
    if tp is str:
        value = raw[1:-1] if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'" else raw
    else:
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"override {text!r}: cannot read {raw!r} as {tp.__name__} ({e})") from e
    return section, key, _check_value(f"{section}.{key}", types[key], value)


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """A copy of `cfg` with each `section.key=value` applied in order."""
    cfg = dataclasses.replace(cfg, **{f.name: dataclasses.replace(getattr(cfg, f.name))
                                      for f in dataclasses.fields(cfg)})
    for text in overrides:
        section, key, value = parse_override(text)
        setattr(getattr(cfg, section), key, value)
    return cfg


def load_recipe(path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a TOML recipe and apply `overrides`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} not found")
    with path.open("rb") as f:
        try:
            d = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"recipe {path} is not valid TOML: {e}") from e
    return validate(apply_overrides(from_dict(d), overrides or []))


_LIMITS = {  # key: (lowest allowed, strictly above it?)
    "schedule.steps": (1, False), "schedule.warmup_steps": (0, False), "data.batch_size": (1, False),
    "data.seq_len": (2, False), "optim.lr": (0, True), "optim.eps": (0, True), "optim.weight_decay": (0, False),
    "optim.grad_clip": (0, False), "optim.grad_accum": (1, False), "optim.min_lr_ratio": (0, False),
    "checkpoint.every": (0, False), "checkpoint.keep_last": (0, False), "run.log_every": (1, False),
    "run.max_consecutive_nonfinite": (1, False), "run.threads": (0, False), "model.lora_rank": (1, False),
}


def validate(cfg: TrainConfig) -> TrainConfig:
    """`cfg` if its values make sense, else a ValueError naming the key (before any work is done)."""
    for key, (low, strict) in _LIMITS.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise ValueError(f"{key} = {value!r}: must be {'>' if strict else '>='} {low}")
    betas = cfg.optim.betas
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                  for b in betas):
        raise ValueError(f"optim.betas = {betas!r}: must be two numbers in [0, 1)")
    if cfg.model.expert_init not in EXPERT_INITS:
        raise ValueError(f"model.expert_init = {cfg.model.expert_init!r}: must be one of {', '.join(EXPERT_INITS)}")
    if cfg.run.device != "auto" and not re.fullmatch(r"(cpu|cuda|mps|xpu)(:\d+)?", cfg.run.device):
        raise ValueError(f"run.device = {cfg.run.device!r}: must be auto, cpu, cuda, cuda:N, mps or xpu")
    return cfg


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)

