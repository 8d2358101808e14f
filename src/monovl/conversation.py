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
    """A chat session: earlier turns and their images' tiles, re-rendered into each new prompt."""
    model: torch.nn.Module
    tokenizer: Tokenizer
    system: str | None = None  # None: the template's default system message
    max_tiles: int | None = None  # None: the checkpoint's max_dynamic_patch
    raw_special_tokens: bool = False  # True: special tokens typed in questions are control tokens
    history: list[Turn] = field(default_factory=list)
    pixels: list[torch.Tensor] = field(default_factory=list)  # (N_i, 3, S, S) per earlier image

    def stream(self, question: str, images: Sequence = (), **generate_kwargs) -> Iterator[str]:
        """Yield the answer's text piece by piece; the finished turn is added to the history."""
        inputs = build_inputs(self.model, self.tokenizer, question, images, history=self.history, system=self.system,
                              max_tiles=self.max_tiles, raw_special_tokens=self.raw_special_tokens)
        tiles = inputs.num_tiles
        new = list(inputs.pixel_values.split(tiles)) if tiles else []  # (N_i, 3, S, S) per image
        pixels = torch.cat(self.pixels + new) if self.pixels or new else None
        generate_kwargs.setdefault("stop_token_ids", self.tokenizer.stop_token_ids)
        generate_kwargs.setdefault("max_new_tokens", 512)
        decoder, stops = StreamDecoder(self.tokenizer), set(generate_kwargs["stop_token_ids"])
        for tok in stream_generate(self.model, [inputs.input_ids], pixels, **generate_kwargs):
            if int(tok[0]) in stops:
                break
            if piece := decoder.put(int(tok[0])):
                yield piece
        if tail := decoder.flush():
            yield tail
        answer = extract_answer(self.tokenizer.decode(decoder.ids))
        asked = add_image_placeholders(question, len(tiles))
        self.history.append(Turn(asked, answer, tuple(tiles)))
        self.pixels += new

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
