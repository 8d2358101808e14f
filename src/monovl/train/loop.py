"""The training loop: AdamW with weight-decay groups, linear warmup + cosine, gradient accumulation and
clipping, NaN/inf step skipping, periodic atomic training states with resume, metrics, release export.

Loss of an optimizer step = summed cross-entropy of every label token of the global batch (all micro steps,
all processes) / their number, so 2 processes × half the batch give the loss of 1 process × the whole batch.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from monovl.train import parallel
from monovl.train.freeze import adamw, freeze, param_groups
from monovl.train.lora import apply_lora, merge_lora
from monovl.train.metrics import MetricsWriter
from monovl.train.objective import loss as loss_of
from monovl.train.preflight import check_space, preflight
from monovl.train.recipe import TrainConfig, to_dict, validate
from monovl.train.state import clean_temporary, list_states, load_state, newest_good_state, save_state

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many NaN/inf steps in a row; the training state was saved before raising."""


class SyntheticData:
    """Deterministic samples, each one image tile then a learnable token sequence (t_{i+1} = 7·t_i + 3 mod V').
    Sample g depends only on (seed, g), so any split of the global batch over processes sees the same data."""

    def __init__(self, cfg: TrainConfig, model_cfg, rank: int = 0, world: int = 1):
        d = cfg.data
        if d.batch_size % world:
            raise ValueError(f"data.batch_size {d.batch_size} is not divisible by the {world} processes")
        self.cfg, self.model_cfg, self.rank, self.world = d, model_cfg, rank, world
        num_image_token = model_cfg.num_image_token
        if d.seq_len < num_image_token + 8:
            raise ValueError(f"data.seq_len {d.seq_len} is too short for one image ({num_image_token} tokens) and "
                             "some text")
        self.index = 0  # micro batches consumed

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = state["index"]

    def _sample(self, g: int):
        d, mc = self.cfg, self.model_cfg
        gen = torch.Generator().manual_seed(d.seed * 1_000_003 + g)
        num_image_token = mc.num_image_token if mc.image_token_id is not None else 0
        vocab = min(mc.llm.vocab_size, mc.image_token_id or mc.llm.vocab_size) - 3
        ids = torch.empty(d.seq_len, dtype=torch.long)
        t = int(torch.randint(vocab, (1,), generator=gen))
        for i in range(d.seq_len):
            ids[i] = t + 3
            t = (7 * t + 3) % vocab
        labels = ids.clone()
        prompt = int(torch.randint(num_image_token + 1, max(num_image_token + 2, d.seq_len // 2), (1,), generator=gen))
        labels[:prompt] = -100
        pixels = None
        if num_image_token:
            ids[1:1 + num_image_token] = mc.image_token_id
            s = mc.vision.image_size
            pixels = torch.randn(1, 3, s, s, generator=gen)
        return ids, labels, pixels

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        local = self.cfg.batch_size // self.world
        first = self.index * self.cfg.batch_size + self.rank * local
        samples = [self._sample(first + j) for j in range(local)]
        self.index += 1
        pixels = [p for _, _, p in samples if p is not None]
        return {"input_ids": torch.stack([s[0] for s in samples]), "labels": torch.stack([s[1] for s in samples]),
                "input_pos": None, "pixel_values": torch.cat(pixels) if pixels else None}


def build_model(cfg: TrainConfig, device: torch.device):
    """(model in fp32 on `device`, tokenizer or None) from `model.path` (monolithized on the fly when it is a
    plain InternLM2 LLM) or a random `model.preset`."""
    from monovl import load
    from monovl.config import preset
    from monovl.scratch import random_model

    m = cfg.model
    if m.path:
        model, tokenizer = load(m.path, dtype=torch.float32, device=device)
        geometry = preset(m.preset)
        if model.cfg.vision is None and geometry.vision is not None:  # a plain LLM and a vision preset:
            from monovl.train.monolithize import monolithize  # add the patch embedding, mlp1, experts, tokens

            model, tokenizer = monolithize(model, tokenizer, vision=geometry.vision,
                                           downsample_ratio=geometry.downsample_ratio,
                                           max_dynamic_patch=geometry.max_dynamic_patch,
                                           visual_attention_experts=m.attention_experts, seed=m.seed,
                                           expert_init=m.expert_init)
            model = model.to(device)
        return model.train(), tokenizer
    return random_model(preset(m.preset), seed=m.seed, device=device).train(), None


def build_data(cfg: TrainConfig, model_cfg, tokenizer, rank: int, world: int):
    """The `[data]` section's loader for this process (`batch_size / world` rows per micro step). A mix sets the
    model config's tile budget to its own `max_tiles`: the export says what it trained with, as the official
    fine-tuning writes its data arguments into the config."""
    d = cfg.data
    if d.kind == "synthetic":
        return SyntheticData(cfg, model_cfg, rank, world)
    if d.kind != "mix":
        raise ValueError(f"unknown data.kind {d.kind!r}; choose synthetic or mix")
    from monovl.train.data import DataConfig, SourceConfig, TrainLoader

    if tokenizer is None:
        raise ValueError("data.kind = mix needs a tokenizer: set model.path to a checkpoint folder")
    if not d.sources:
        raise ValueError("data.kind = mix needs data.sources = [{kind = ..., path = ...}, ...]")
    if d.batch_size % world:
        raise ValueError(f"data.batch_size {d.batch_size} is not divisible by the {world} processes")
    try:
        dcfg = DataConfig(sources=[SourceConfig(**s) for s in d.sources], seq_len=d.seq_len,
                          micro_batch=d.batch_size // world, seed=d.seed, **d.options)
    except TypeError as e:  # an unknown key in data.sources or data.options
        raise ValueError(f"bad data.sources / data.options: {e}") from e
    if model_cfg.vision is not None:
        model_cfg.max_dynamic_patch = dcfg.max_tiles
    return TrainLoader(dcfg, tokenizer, model_cfg, rank, world)


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Multiplier of the peak lr at step s: linear warmup to 1 over `warmup` steps, then cosine to `min_ratio`."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def _all_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _device(name: str) -> torch.device:
    from monovl.checkpoint import parse_device

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return parse_device(name)
    except ValueError as e:
        raise ValueError(f"run.device: {e}") from None


def prepare_model(cfg: TrainConfig, device: torch.device, mesh, compute_dtype):
    """(model, tokenizer) built and transformed in a visible order: freeze, LoRA, activation checkpointing,
    compile, FSDP."""
    torch.manual_seed(cfg.run.seed)
    model, tokenizer = build_model(cfg, device)
    m = cfg.model
    if m.dtype not in ("auto", "float32", "fp32", "bfloat16", "bf16"):
        raise ValueError(f"model.dtype {m.dtype!r}: choose auto, float32 or bfloat16")
    freeze(model, m.trainable or m.stage)
    if m.lora_targets:
        apply_lora(model, m.lora_targets, m.lora_rank, m.lora_alpha)
    if m.activation_checkpointing:
        parallel.apply_ac(model)
    if m.compile:
        parallel.apply_compile(model)
    if mesh is not None:
        parallel.apply_fsdp(model, mesh, param_dtype=compute_dtype)
    return model, tokenizer


def _setup(cfg: TrainConfig):
    """(device, rank, world size, device mesh or None, compute dtype or None) of this process."""
    validate(cfg)
    device = _device(cfg.run.device)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    rank, world, mesh = parallel.init_distributed(device.type)
    if world > 1:
        if not cfg.run.fsdp:
            raise ValueError("several processes need run.fsdp = true")
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
    bf16 = cfg.model.dtype in ("bf16", "bfloat16") or (cfg.model.dtype == "auto" and device.type == "cuda")
    return device, rank, world, mesh, torch.bfloat16 if bf16 else None


def _optimizer_step(model, micro: list[dict], params, optimizer, grad_clip: float, world: int, autocast_dtype,
                    step: int, loss_chunk: int = 0) -> tuple[float, float, int]:
    """Forward/backward over the micro batches, clip, and step unless the loss or the gradient is not finite.
    Returns (loss, grad norm, tokens of the global batch)."""
    n_labels = _all_sum(sum((b["labels"][:, 1:] != -100).sum() for b in micro).float())
    n_tokens = int(_all_sum(torch.tensor(float(sum(b["input_ids"].numel() for b in micro)))))
    if n_labels.item() == 0:
        raise ValueError(f"step {step}: the batch has no label tokens (every label is -100)")
    total_loss = torch.zeros((), device=micro[0]["input_ids"].device)
    for b in micro:
        s = loss_of(model, b, autocast_dtype, loss_chunk)
        (s * world / n_labels).backward()  # FSDP averages gradients over the processes
        total_loss += s.detach()
    loss = float(_all_sum(total_loss) / n_labels)
    grad_norm = float("nan")
    if math.isfinite(loss):
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if math.isfinite(grad_norm):
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm, n_tokens


def _resume(ckpt_dir: Path, model, optimizer, scheduler, data, load: bool = True, rank: int = 0) -> tuple[int, int]:
    """Delete what killed or failed state writes left (rank 0); then, if `load`, load the newest intact
    training state in `ckpt_dir`, if any. Returns (step reached, steps skipped so far)."""
    if rank == 0:
        clean_temporary(ckpt_dir)
    if not load:
        return 0, 0
    state = newest_good_state(ckpt_dir)
    if state is None:
        if list_states(ckpt_dir):
            raise RuntimeError(f"no training state in {ckpt_dir} is intact: remove them to start over")
        return 0, 0
    trainer = load_state(state, model, optimizer)
    scheduler.load_state_dict(trainer["scheduler"])
    data.load_state_dict(trainer["data"])
    return trainer["step"], trainer["skipped"]


def _open_metrics(cfg: TrainConfig, run_dir: Path, start: int) -> MetricsWriter:
    """The metrics writer, with the resolved recipe (overrides applied) written next to the metrics."""
    metrics = MetricsWriter(run_dir, resume_step=start, tensorboard=cfg.run.tensorboard)
    (run_dir / "recipe.json").write_text(json.dumps(to_dict(cfg), indent=2))
    return metrics


def _prepare(cfg: TrainConfig, device: torch.device, mesh, compute_dtype, rank: int):
    """(model, tokenizer, trainable parameters); rank 0 checks that the disk can hold a training state."""
    model, tokenizer = prepare_model(cfg, device, mesh, compute_dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    if rank == 0:
        check_space(Path(cfg.run.out_dir), sum(p.numel() for p in model.parameters()), sum(p.numel() for p in params))
    return model, tokenizer, params


def train(cfg: TrainConfig, data=None, *, force: bool = False) -> dict:
    """Run `cfg`; `data` (an iterator of batch dicts with state_dict/load_state_dict) replaces `[data]`.
    Returns {"step", "losses", "skipped", "run_dir", "final"} (and "already_done" for a finished run). A run
    folder holding a run of another recipe is refused unless `force` (see `preflight`)."""
    device, rank, world, mesh, compute_dtype = _setup(cfg)
    if (done := preflight(cfg, rank, force)) is not None:
        return done
    run_dir, o, total = Path(cfg.run.out_dir), cfg.optim, cfg.schedule.steps
    ckpt_dir = run_dir / "checkpoints"
    model, tokenizer, params = _prepare(cfg, device, mesh, compute_dtype, rank)
    autocast_dtype = compute_dtype if mesh is None else None  # FSDP casts parameters itself
    optimizer = adamw(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.schedule.warmup_steps, total, o.min_lr_ratio))
    data = data if data is not None else build_data(cfg, model.cfg, tokenizer, rank, world)

    start, skipped = _resume(ckpt_dir, model, optimizer, scheduler, data, load=cfg.run.resume, rank=rank)
    stream = iter(data)

    def save(step: int) -> None:
        trainer = {"scheduler": scheduler.state_dict(), "data": data.state_dict(), "skipped": skipped}
        save_state(ckpt_dir, step, model, optimizer, trainer, cfg.checkpoint.keep_last)

    metrics = _open_metrics(cfg, run_dir, start) if rank == 0 else None
    bar = tqdm(total=total, initial=start, disable=not cfg.run.progress or rank != 0, desc="train",
               dynamic_ncols=True)
    losses, consecutive = [], 0
    try:
        for step in range(start + 1, total + 1):
            t0 = time.perf_counter()
            micro = [_to(next(stream), device) for _ in range(o.grad_accum)]
            loss, grad_norm, n_tokens = _optimizer_step(model, micro, params, optimizer, o.grad_clip, world,
                                                        autocast_dtype, step, cfg.model.loss_chunk)
            if math.isfinite(loss) and math.isfinite(grad_norm):
                consecutive = 0
            else:
                skipped, consecutive = skipped + 1, consecutive + 1
                log.warning("step %d: non-finite loss or gradient (loss %s, grad norm %s): step skipped",
                            step, loss, grad_norm)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            losses.append(loss)
            dt = time.perf_counter() - t0
            if metrics is not None and (step % cfg.run.log_every == 0 or step == total):
                metrics.write({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": n_tokens,
                               "tokens_per_s": n_tokens / dt, "skipped": skipped})
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{n_tokens / dt:.0f}")
            bar.update(1)
            if consecutive >= cfg.run.max_consecutive_nonfinite:
                save(step)
                raise _nonfinite(consecutive, step, ckpt_dir)
            if step == total or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
                save(step)
        final = _export(model, tokenizer, run_dir / "final", device, cfg.model) if cfg.checkpoint.export else None
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    return {"step": total, "losses": losses, "skipped": skipped, "run_dir": run_dir, "final": final}


def _nonfinite(consecutive: int, step: int, ckpt_dir: Path) -> NonFiniteLossError:
    return NonFiniteLossError(
        f"{consecutive} non-finite (NaN/inf) steps in a row, up to step {step}: stopping; the training state was "
        f"saved in {ckpt_dir}. Lower optim.lr, check the data, or raise run.max_consecutive_nonfinite")


def _export(model, tokenizer, path: Path, device: torch.device, m) -> Path | None:
    """The trained model in the release format (bf16 on GPU, fp32 on CPU), LoRA merged. Collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from monovl.checkpoint import save_model
    from monovl.model import MonoInternVL

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    with torch.device("meta"):
        plain = MonoInternVL(model.cfg)
        if m.lora_targets:
            apply_lora(plain, m.lora_targets, m.lora_rank, m.lora_alpha)
    plain.load_state_dict(sd, assign=True)
    plain.language_model.tie_weights()  # `assign` gives a tied head its own tensor
    merge_lora(plain)
    save_model(plain, path, dtype=torch.bfloat16 if device.type == "cuda" else None, tokenizer=tokenizer)
    log.info("exported the trained model to %s", path)
    return path
