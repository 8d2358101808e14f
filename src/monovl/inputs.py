"""Model inputs from text and images, with the tiling the model's config asks for.

`image_tiles` is the one place that reads a config's tile size, tile budget, thumbnail and dynamic-tiling
settings; `build_inputs` turns one user turn (plus earlier turns) into token ids and pixel values.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from monovl.config import ModelConfig
from monovl.images import ImageSource, load_pixel_values
from monovl.chat_template import encode_messages
from monovl.config import TOKENIZER_TEMPLATE
from monovl.template import Turn, build_query, query_messages, query_segments


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # (T,)
    pixel_values: torch.Tensor | None  # (N, 3, S, S): the tiles of every image, in order; None without images
    num_tiles: list[int]  # tiles of each image


def image_tiles(cfg: ModelConfig, image: ImageSource, max_tiles: int | None = None, **load_kwargs) -> torch.Tensor:
    """One image → pixel_values (tiles, 3, S, S), tiled as `cfg` says; `max_tiles` None: `cfg.max_dynamic_patch`.
    Further keywords go to `load_pixel_values` (e.g. `max_pixels`)."""
    if cfg.vision is None:
        raise ValueError("this model is a text-only LLM: it cannot take images")
    return load_pixel_values(image, image_size=cfg.vision.image_size, min_tiles=cfg.min_dynamic_patch,
                             max_tiles=max_tiles or cfg.max_dynamic_patch, use_thumbnail=cfg.use_thumbnail,
                             dynamic=cfg.dynamic_image_size, **load_kwargs)


def build_inputs(model, tokenizer, text: str, images: Sequence[ImageSource] = (), *,
                 history: Sequence[Turn] = (), system: str | None = None,
                 max_tiles: int | None = None, raw_special_tokens: bool = False) -> ModelInputs:
    """The prompt of one user turn about `images` (paths, bytes or PIL images) after `history`, in the model's
    chat template, with `<image>` placeholders expanded to each image's `<IMG_CONTEXT>` tokens.

    Special tokens typed in `text`, `history` or `system` (e.g. `<|im_end|>`) stay text, unless
    `raw_special_tokens`: then they are control tokens, as in the prompt string `build_query` returns."""
    pixels = [image_tiles(model.cfg, image, max_tiles) for image in images]
    num_tiles = [len(p) for p in pixels]
    if model.cfg.template == TOKENIZER_TEMPLATE:  # Qwen, Llama: the tokenizer's own chat template
        ids = encode_messages(TOKENIZER_TEMPLATE, tokenizer, query_messages(text, num_tiles, history), system=system,
                              num_image_token=model.cfg.num_image_token, raw_special_tokens=raw_special_tokens)
        return ModelInputs(torch.tensor(ids), torch.cat(pixels) if pixels else None, num_tiles)
    args = (text, num_tiles, history, system, model.cfg.num_image_token)
    ids = tokenizer.encode(build_query(*args) if raw_special_tokens else query_segments(*args))
    return ModelInputs(torch.tensor(ids), torch.cat(pixels) if pixels else None, num_tiles)
