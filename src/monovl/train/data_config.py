"""The `[data]` options of a `mix` run: its sources and how samples are rendered, packed and loaded."""
from __future__ import annotations

from dataclasses import dataclass, field

SOURCE_KINDS = ("pairs", "webdataset", "conversations", "meta", "text")


@dataclass
class SourceConfig:
    kind: str  # one of SOURCE_KINDS
    path: str  # a JSONL/JSON file; webdataset: a .tar file or a folder of them
    weight: float = 1.0  # relative sampling weight in the mix
    root: str | None = None  # folder of relative image paths (default: the annotation file's folder)
    name: str = ""


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    seq_len: int = 4096
    micro_batch: int = 1  # rows per batch
    pack: bool = True  # several samples per row (False: one)
    max_tiles: int = 6
    caption_prompt: str = "Describe the image."
    system: str | None = None  # None: the template's default system message
    overlong: str = "truncate"  # "truncate" | "drop"
    strict: bool = False  # raise on bad data instead of skipping it
    seed: int = 0
    num_workers: int = 0
