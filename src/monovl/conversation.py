"""Multi-turn chat with images: the `internlm2-chat` template, dynamic tiling and streaming generation."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from monovl.generation import stream_generate
from monovl.inputs import build_inputs
from monovl.template import Turn, add_image_placeholders, extract_answer
from monovl.tokenizer import StreamDecoder, Tokenizer


@dataclass
class Conversation:
    """A chat session: earlier turns and their images' tiles, re-rendered into each new prompt.

    With `reuse_prefix` (the default) the session keeps the KV cache of what it has run so far (earlier prompts
    and answers, images included) and prefills only the tokens that differ from it (matched on token ids), so a
    follow-up turn costs its new tokens only; the greedy answers are the same as without it (tested)."""
    model: torch.nn.Module
    tokenizer: Tokenizer
    system: str | None = None  # None: the template's default system message
    max_tiles: int | None = None  # None: the checkpoint's max_dynamic_patch
    raw_special_tokens: bool = False  # True: special tokens typed in questions are control tokens
    history: list[Turn] = field(default_factory=list)
    pixels: list[torch.Tensor] = field(default_factory=list)  # (N_i, 3, S, S) per earlier image
    reuse_prefix: bool = True
    last_reused: int = 0  # prompt tokens of the last turn whose keys and values came from the cache
    _cache: object = field(default=None, repr=False)  # KVCache of one row
    _cached_ids: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long), repr=False)

    def stream(self, question: str, images: Sequence = (), **generate_kwargs) -> Iterator[str]:
        """Yield the answer's text piece by piece; the finished turn is added to the history."""
        inputs = build_inputs(self.model, self.tokenizer, question, images, history=self.history, system=self.system,
                              max_tiles=self.max_tiles, raw_special_tokens=self.raw_special_tokens)
        tiles = inputs.num_tiles
        new = list(inputs.pixel_values.split(tiles)) if tiles else []  # (N_i, 3, S, S) per image
        pixels = torch.cat(self.pixels + new) if self.pixels or new else None
        generate_kwargs.setdefault("stop_token_ids", self.tokenizer.stop_token_ids)
        generate_kwargs.setdefault("max_new_tokens", 512)
        ids = inputs.input_ids
        if self.reuse_prefix:
            generate_kwargs["cache"], generate_kwargs["cached"], pixels = self._reuse(
                ids, pixels, generate_kwargs["max_new_tokens"])
        decoder, stops, fed = StreamDecoder(self.tokenizer), set(generate_kwargs["stop_token_ids"]), []
        try:
            for tok in stream_generate(self.model, [ids], pixels, **generate_kwargs):
                fed.append(int(tok[0]))
                if fed[-1] in stops:
                    break
                if piece := decoder.put(fed[-1]):
                    yield piece
        finally:  # the cache holds the prompt and every token but the last one sampled (never fed)
            if self.reuse_prefix and fed:
                self._cached_ids = torch.cat([ids, torch.tensor(fed[:-1], dtype=torch.long)])
        if tail := decoder.flush():
            yield tail
        answer = extract_answer(self.tokenizer.decode(decoder.ids))
        asked = add_image_placeholders(question, len(tiles))
        self.history.append(Turn(asked, answer, tuple(tiles)))
        self.pixels += new

    def _reuse(self, ids: torch.Tensor, pixels: torch.Tensor | None, max_new_tokens: int):
        """(cache, cached, pixels of the tiles after the reused prefix) for the prompt `ids`."""
        old = self._cached_ids
        n = min(len(old), len(ids) - 1)  # at least one token left to prefill
        same = (old[:n] == ids[:n]).long()
        cached = int(same.cumprod(0).sum()) if n else 0
        visual = ids == self.model.cfg.image_token_id if self.model.cfg.image_token_id is not None else ids < 0
        per_tile = max(self.model.cfg.num_image_token, 1)
        partial = int(visual[:cached].sum()) % per_tile  # never split a tile: back off to its first token
        if partial:
            cached = int(visual.nonzero()[int(visual[:cached].sum()) - partial])
        need = len(ids) + max_new_tokens
        if self._cache is None or self._cache.max_len < need:
            grown = self.model.new_cache(1, max(need, 2 * self._cache.max_len if self._cache is not None else 0))
            if self._cache is not None and cached:
                grown.k[:, :, :, :cached] = self._cache.k[:, :, :, :cached]
                grown.v[:, :, :, :cached] = self._cache.v[:, :, :, :cached]
            self._cache = grown
        self._cached_ids, self.last_reused = ids[:cached], cached  # valid whatever happens next
        done_tiles = int(visual[:cached].sum()) // per_tile
        if pixels is not None:
            pixels = pixels[done_tiles:] if done_tiles < len(pixels) else None
        return self._cache, cached, pixels

    def ask(self, question: str, images: Sequence = (), **generate_kwargs) -> str:
        for _ in self.stream(question, images, **generate_kwargs):
            pass
        return self.history[-1].answer


def chat(model, tokenizer: Tokenizer, question: str, images: Sequence = (), history: Sequence[Turn] = (),
         pixels: Sequence[torch.Tensor] = (), **kwargs) -> tuple[str, list[Turn]]:
    """One answer to `question` about `images` (paths or PIL images) after `history`; returns (answer, history).

    Images of earlier turns are re-used from `pixels` (one tensor per image, as `Conversation.pixels`).
    Keyword arguments: `system`, `max_tiles`, and those of `monovl.generate`.
    """
    conv = Conversation(model, tokenizer, system=kwargs.pop("system", None), max_tiles=kwargs.pop("max_tiles", None),
                        history=list(history), pixels=list(pixels))
    return conv.ask(question, images, **kwargs), conv.history
