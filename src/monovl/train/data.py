"""Training data: image–text pairs, WebDataset tar shards, LLaVA/InternVL conversations, meta JSON, pure text.

Every sample is rendered with the inference template and tokenizer (`monovl.template`, `Tokenizer.encode`)
and the inference tiling (`load_pixel_values`); loss falls on caption / assistant tokens (each assistant
turn's answer and its closing `<|im_end|>`) and on every text token of pure text after BOS. Items are
streamed and split across ranks and DataLoader workers: item i of a source goes to global worker
i % (world_size * num_workers) (tar shards: shard j to worker j % W when there are at least W shards).
Sources are mixed by weight with a seeded RNG and cycled. Bad items are skipped and counted in
`DataStats` (`strict` raises instead). `TrainLoader.state_dict()` resumes at exactly the next batch.
Items are read in file order (no shuffling within a source): shuffle annotation files beforehand.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import random
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from monovl.template import IMAGE_PLACEHOLDER
from monovl.train.data_config import SOURCE_KINDS, DataConfig, SourceConfig
from monovl.train.packing import BadSample, Packer, Renderer

log = logging.getLogger(__name__)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class DataStats:
    samples: int = 0  # samples placed in batches
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count

    def as_dict(self) -> dict:
        return {"samples": self.samples, "truncated": self.truncated, "skipped": dict(self.skipped)}

    @classmethod
    def merged(cls, dicts) -> "DataStats":
        out = cls()
        for d in dicts:
            out.samples += d["samples"]
            out.truncated += d["truncated"]
            out.skipped.update(d["skipped"])
        return out


def expand_meta(src: SourceConfig) -> list[SourceConfig]:
    """The official meta JSON {name: {root, annotation, repeat_time, length}} → conversation sources.

    Weight = source weight · repeat_time · length (length 1 when absent); relative paths are taken from
    the meta file's folder.
    """
    base = Path(src.path).parent
    try:
        meta = json.loads(Path(src.path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the meta JSON {src.path}: {e}") from e
    out = []
    for name, entry in meta.items():
        if "annotation" not in entry:
            raise ValueError(f"meta JSON {src.path}: entry {name!r} has no 'annotation'")
        weight = src.weight * float(entry.get("repeat_time", 1)) * float(entry.get("length") or 1)
        root = str(base / entry["root"]) if entry.get("root") else None
        out.append(SourceConfig("conversations", str(base / entry["annotation"]), weight, root, name))
    return out


def _items(src: SourceConfig, worker: int, workers: int) -> Iterator[tuple[str, object]]:
    """(where, raw item) of this worker's share of one source, in a fixed order."""
    path = Path(src.path)
    if src.kind == "webdataset":
        shards = sorted(path.glob("*.tar")) if path.is_dir() else [path]
        if not shards:
            raise ValueError(f"no .tar shards in {path}")
        by_shard = len(shards) >= workers
        mine = shards[worker::workers] if by_shard else shards
        groups = (g for shard in mine for g in _tar_groups(shard))
        yield from groups if by_shard else islice(groups, worker, None, workers)
    elif path.suffix == ".json":  # a JSON list (LLaVA-665k style)
        records = json.loads(path.read_text(encoding="utf-8"))
        for i in range(worker, len(records), workers):
            yield f"{path}[{i}]", records[i]
    else:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(islice(f, worker, None, workers)):
                yield f"{path}:{worker + i * workers + 1}", line


def _tar_groups(shard: Path) -> Iterator[tuple[str, dict]]:
    """Stream a WebDataset shard: consecutive members sharing a key (name up to the first dot) → {ext: bytes}."""
    key, group = None, {}
    with tarfile.open(shard, mode="r|*") as tf:
        for member in tf:
            if not member.isfile():
                continue
            folder, _, base = member.name.rpartition("/")
            stem, _, ext = base.partition(".")
            name = f"{folder}/{stem}" if folder else stem
            if name != key and group:
                yield f"{shard}:{key}", group
                group = {}
            key = name
            group[ext.lower()] = tf.extractfile(member).read()
    if group:
        yield f"{shard}:{key}", group


def _parse(src: SourceConfig, raw, caption_prompt: str) -> dict:
    """A raw item → {"text": str}, {"segments": [(str, loss?), ...]} or {"images": [...], "messages": [...]};
    raises BadSample."""
    if src.kind == "webdataset":
        images = [raw[e] for e in IMAGE_EXTS if e in raw]
        caption = raw["txt"].decode("utf-8").strip() if "txt" in raw else None
        if caption is None and "json" in raw:
            caption = _load_json(raw["json"]).get("caption")
        if not images or not caption:
            raise BadSample("malformed", f"needs an image and a .txt/.json caption, has {sorted(raw)}")
        return {"images": images[:1], "messages": _pair(caption, caption_prompt)}
    record = _load_json(raw) if isinstance(raw, str) else raw
    root = Path(src.root) if src.root else Path(src.path).parent
    try:
        if src.kind == "text":
            if "segments" in record:  # [{"text": str, "loss": bool}, ...]: a text with loss on some parts only
                return {"segments": [(_str(g["text"]), bool(g.get("loss", True))) for g in record["segments"]]}
            return {"text": _str(record["text"])}
        if src.kind == "pairs":
            return {"images": [root / _str(record["image"])], "messages": _pair(_str(record["caption"]), caption_prompt)}
        image = record.get("image") or []
        images = [root / _str(p) for p in (image if isinstance(image, list) else [image])]
        messages = [{"role": ROLES[turn["from"]], "content": _str(turn["value"])} for turn in record["conversations"]]
    except (KeyError, TypeError, AttributeError) as e:
        raise BadSample("malformed", f"malformed {src.kind} record ({type(e).__name__}: {e})") from e
    return {"images": images, "messages": messages}


def _load_json(raw):
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadSample("malformed", f"malformed JSON ({e})") from e
    if not isinstance(record, dict):
        raise BadSample("malformed", f"expected a JSON object, got {type(record).__name__}")
    return record


def _str(value) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _pair(caption: str, prompt: str) -> list[dict]:
    return [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{prompt}"}, {"role": "assistant", "content": caption}]


class TrainData(IterableDataset):
    """The batches of one rank: items of this worker's share, mixed, rendered and packed.

    Each batch also carries `_worker` (logical worker id) and `_state`, that worker's state after the
    batch, which `TrainLoader` keeps for `state_dict()`. `resume` / `offset` are set by `TrainLoader`.
    """

    def __init__(self, cfg: DataConfig, tokenizer, model_cfg, rank: int = 0, world_size: int = 1):
        if not cfg.sources:
            raise ValueError("DataConfig.sources is empty")
        if cfg.overlong not in ("truncate", "drop"):
            raise ValueError(f"overlong must be 'truncate' or 'drop', got {cfg.overlong!r}")
        for src in cfg.sources:
            if src.kind not in SOURCE_KINDS:
                raise ValueError(f"unknown source kind {src.kind!r} for {src.path}; choose one of {SOURCE_KINDS}")
        self.sources = [s for src in cfg.sources for s in (expand_meta(src) if src.kind == "meta" else [src])]
        if not sum(s.weight for s in self.sources) > 0:
            raise ValueError("the source weights must sum to more than 0")
        self.sources = [dataclasses.replace(s, name=s.name or Path(s.path).stem) for s in self.sources]
        self.cfg, self.tokenizer, self.model_cfg = cfg, tokenizer, model_cfg
        self.rank, self.world_size = rank, world_size
        self.resume: dict[int, dict] = {}
        self.offset = 0

    def __iter__(self):
        info = get_worker_info()
        n_workers = info.num_workers if info is not None else 1
        logical = ((info.id if info is not None else 0) + self.offset) % n_workers
        yield from self.batches(logical, n_workers)

    def batches(self, logical: int, n_workers: int) -> Iterator[dict]:
        cfg, n = self.cfg, len(self.sources)
        worker, workers = self.rank * n_workers + logical, self.world_size * n_workers
        state = copy.deepcopy(self.resume.get(logical)) or {
            "rng": _rng_state(random.Random(cfg.seed * 1_000_003 + worker)), "pos": [0] * n, "epoch": [0] * n,
            "stats": DataStats().as_dict()}
        rng = random.Random()
        rng.setstate((state["rng"][0], tuple(state["rng"][1]), state["rng"][2]))
        pos, epoch, stats = list(state["pos"]), list(state["epoch"]), DataStats.merged([state["stats"]])
        render, packer = Renderer(cfg, self.tokenizer, self.model_cfg), Packer(cfg.micro_batch, cfg.seq_len, cfg.pack)
        streams: list = [None] * n
        good = [None] * n  # usable items in the current pass, when that pass started here at item 0
        weights = [s.weight for s in self.sources]
        while True:
            before = {"rng": _rng_state(rng), "pos": list(pos), "epoch": list(epoch), "stats": stats.as_dict()}
            while True:  # draw until a usable sample
                k = rng.choices(range(n), weights)[0]
                src = self.sources[k]
                if streams[k] is None:
                    streams[k] = islice(_items(src, worker, workers), pos[k], None)
                    good[k] = 0 if pos[k] == 0 else None
                try:
                    where, raw = next(streams[k])
                except StopIteration:
                    if good[k] == 0:
                        raise ValueError(f"source {src.name} ({src.path}) has no usable items for worker "
                                         f"{worker} of {workers}") from None
                    streams[k], pos[k], epoch[k] = None, 0, epoch[k] + 1
                    continue
                pos[k] += 1
                try:
                    sample = render(_parse(src, raw, cfg.caption_prompt))
                    break
                except BadSample as e:
                    if cfg.strict:
                        raise ValueError(f"bad training item at {where}: {e}") from e
                    stats.skipped[e.reason] += 1
                    log.warning("skipping %s (%s): %s", where, e.reason, e)
            good[k] = None if good[k] is None else good[k] + 1
            sample.source = src.name
            if not packer.add(sample):
                batch = packer.take(self.tokenizer.pad_id)
                yield {**batch, "_worker": logical, "_state": before}
                packer.add(sample)
            stats.samples += 1
            stats.truncated += sample.truncated


def _rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


class TrainLoader:
    """Iterates the batches of one rank (through a DataLoader when num_workers > 0); resumable.

    `state_dict()` after k batches + `load_state_dict()` on a fresh loader → its first batch is batch k+1.
    """

    def __init__(self, cfg: DataConfig, tokenizer, model_cfg, rank: int = 0, world_size: int = 1):
        self.cfg = cfg
        self.dataset = TrainData(cfg, tokenizer, model_cfg, rank, world_size)
        self.num_batches = 0
        self.workers: dict[int, dict] = {}  # logical worker -> its state after its last batch handed out

    def __iter__(self) -> Iterator[dict]:
        self.dataset.resume = copy.deepcopy(self.workers)
        self.dataset.offset = self.num_batches % max(1, self.cfg.num_workers)
        if self.cfg.num_workers > 0:
            batches = iter(DataLoader(self.dataset, batch_size=None, num_workers=self.cfg.num_workers))
        else:
            batches = self.dataset.batches(0, 1)
        for batch in batches:
            self.workers[int(batch.pop("_worker"))] = batch.pop("_state")
            self.num_batches += 1
            yield batch

    def _layout(self) -> dict:
        d = self.dataset
        return {"rank": d.rank, "world_size": d.world_size, "num_workers": self.cfg.num_workers}

    def state_dict(self) -> dict:
        return {"num_batches": self.num_batches, "workers": copy.deepcopy(self.workers), **self._layout()}

    def load_state_dict(self, state: dict) -> None:
        saved = {k: state.get(k) for k in self._layout()}
        if saved != self._layout():
            raise ValueError(f"the data state was saved with {saved}, this loader runs with {self._layout()}: "
                             "resume with the same rank, world size and number of workers")
        self.num_batches = int(state["num_batches"])
        self.workers = {int(k): copy.deepcopy(v) for k, v in state["workers"].items()}

    @property
    def stats(self) -> DataStats:
        """Counters summed over workers, as of the last batch handed out."""
        return DataStats.merged(w["stats"] for w in self.workers.values())
