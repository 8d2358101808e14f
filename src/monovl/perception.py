"""What a model reads from the picture, attribute by attribute: the loss of each word of held-out S1.2 captions
("… There are two shapes: a large red star (red) at the top left and …") given the right picture and given
another sample's picture.

The difference (nats per token) is what the picture tells the model about that kind of word; near zero, the model
guesses those words from the caption's own context. It takes seconds, so it is the first check of a change to
visual training (the benchmarks need the reading too: "what colour is the star?" needs the star's shape seen).

    python -m monovl.perception --model DIR [--pairs WORLD/s1_2/heldout.jsonl] [--limit 60] [--max-tiles N]
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from monovl.train.data_config import DataConfig
from monovl.world.data import NUMBER_WORDS
from monovl.world.images import COLOURS, POSITIONS, SHAPES, SIZES

CLASSES = ("colour", "shape", "size", "position", "count", "written", "background")
_POSITION_WORDS = {w for p in POSITIONS for w in p.split()}


@dataclass
class WordLoss:
    tokens: int = 0
    loss: float = 0.0  # summed over tokens, with the right picture
    other: float = 0.0  # the same, with another sample's picture

    @property
    def gap(self) -> float:
        """Mean nats per token that the right picture saves."""
        return (self.other - self.loss) / max(self.tokens, 1)


def word_classes(caption: str) -> list[str | None]:
    """The class of each space-separated word of a world S1.2 caption (None: structure words, and the colour
    repeated in brackets after its shape, which is copied from the caption itself)."""
    out, sentence = [], 0
    for word in caption.split(" "):
        bare = word.strip('.,:"').lower()
        if sentence == 0:
            kind = "background" if bare not in ("a", "wide", "tall", "square", "picture", "with") else None
        elif word.startswith("("):
            kind = None
        elif word.startswith('"'):
            kind = "written"
        elif bare in COLOURS:
            kind = "colour" if sentence == 1 else None  # the written word's ink is not a shape's colour
        elif bare in SHAPES and not word.endswith('"'):
            kind = "shape"
        else:
            kind = ("size" if bare in SIZES else "position" if bare in _POSITION_WORDS
                    else "count" if bare in NUMBER_WORDS else None)
        out.append(kind)
        sentence += word.endswith(".")
    return out


def _caption_tokens(tokenizer, caption: str) -> tuple[list[int], list[str | None]]:
    """The caption's token ids (no BOS) and each token's word class: a token belongs to the word whose prefix first
    produces it (prefixes are encoded one word longer at a time); punctuation belongs to no class."""
    words, classes = caption.split(" "), word_classes(caption)
    ids = tokenizer.encode(caption, add_bos=False)
    owner, done = [None] * len(ids), 0
    for k in range(1, len(words) + 1):
        prefix = tokenizer.encode(" ".join(words[:k]), add_bos=False)
        stable = 0
        while stable < min(len(prefix), len(ids)) and prefix[stable] == ids[stable]:
            stable += 1
        for p in range(done, stable):
            owner[p] = classes[k - 1] if tokenizer.decode([ids[p]]).strip(' .,:;()"') else None  # not punctuation
        done = max(done, stable)
    return ids, owner


@torch.no_grad()
def _token_losses(model, tokenizer, image, ids: list[int], max_tiles: int | None) -> torch.Tensor:
    from monovl.inputs import build_inputs
    inputs = build_inputs(model, tokenizer, DataConfig.caption_prompt, [image], max_tiles=max_tiles)  # S1.2's prompt
    x = torch.cat([inputs.input_ids, torch.tensor(ids)])[None]
    logp = model(x, inputs.pixel_values).float().log_softmax(-1)[0]
    start = len(inputs.input_ids) - 1  # the logits that predict the caption's first token
    return -logp[start:start + len(ids)].gather(-1, torch.tensor(ids)[:, None])[:, 0]


def image_dependence(model, tokenizer, pairs: Path, *, limit: int = 60, max_tiles: int | None = None,
                     shift: int = 7) -> dict[str, WordLoss]:
    """{class: WordLoss} over the first `limit` pairs of a world S1.2 pairs file; the other picture of pair i is
    pair (i + shift) mod n's (`shift` 0: the same picture, so every gap is exactly 0)."""
    from PIL import Image
    pairs = Path(pairs)
    rows = [json.loads(line) for line in pairs.read_text(encoding="utf-8").splitlines() if line.strip()][:limit]
    if not rows:
        raise ValueError(f"{pairs}: no caption pairs")
    images = [Image.open(pairs.parent / row["image"]).convert("RGB") for row in rows]
    result = {c: WordLoss() for c in CLASSES}
    for i, row in enumerate(rows):
        ids, owner = _caption_tokens(tokenizer, row["caption"])
        right = _token_losses(model, tokenizer, images[i], ids, max_tiles)
        other = _token_losses(model, tokenizer, images[(i + shift) % len(rows)], ids, max_tiles)
        for kind, a, b in zip(owner, right.tolist(), other.tolist()):
            if kind is not None:
                w = result[kind]
                w.tokens, w.loss, w.other = w.tokens + 1, w.loss + a, w.other + b
    return {c: w for c, w in result.items() if w.tokens}


def format_table(result: dict[str, WordLoss]) -> str:
    lines = ["| words | tokens | loss, right picture | loss, other picture | gap (nats/token) |",
             "|---|---:|---:|---:|---:|"]
    for c, w in result.items():
        lines.append(f"| {c} | {w.tokens} | {w.loss / w.tokens:.3f} | {w.other / w.tokens:.3f} | {w.gap:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m monovl.perception", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: the shipped tiny model)")
    p.add_argument("--pairs", type=Path, default=Path("data/world/s1_2/heldout.jsonl"),
                   help="a world's S1.2 caption pairs (default: data/world/s1_2/heldout.jsonl)")
    p.add_argument("--limit", type=int, default=60)
    p.add_argument("--max-tiles", type=int, help="tiles per picture (default: the model config's max_dynamic_patch)")
    args = p.parse_args(argv)
    if not args.pairs.is_file():
        p.error(f"--pairs {args.pairs}: no such file (make a world with `monovl world OUT_DIR`)")
    from monovl import load
    from monovl.checkpoint import SHIPPED_MODEL
    model, tokenizer = load(args.model or SHIPPED_MODEL, dtype=torch.float32)
    print(format_table(image_dependence(model, tokenizer, args.pairs, limit=args.limit, max_tiles=args.max_tiles)))


if __name__ == "__main__":
    main()
