"""OpenAI messages → model inputs: images read from data: URLs or the allowed media folder, tiled as the
checkpoint's config says, and every message rendered with the chat template."""
from __future__ import annotations

import base64
import binascii
from pathlib import Path

import torch

from monovl.chat_template import encode_messages
from monovl.images import ImageError
from monovl.inputs import image_tiles
from monovl.serve.protocol import APIError, ChatRequest, ServeConfig, TextPart
from monovl.template import IMAGE_PLACEHOLDER, add_image_placeholders
from monovl.tokenizer import Tokenizer


def _image_bytes(url: str, cfg: ServeConfig) -> bytes | Path:
    if url.startswith("data:"):
        header, sep, data = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise APIError(400, "image data: URLs must be base64 ('data:image/png;base64,...')", "invalid_image")
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as e:
            raise APIError(400, f"invalid base64 in image data: URL ({e})", "invalid_image") from None
    if url.startswith(("http://", "https://")):
        raise APIError(400, "remote image URLs are not fetched by this server; send the image as a base64 "
                            "data: URL", "invalid_image")
    path = Path(url.removeprefix("file://"))
    root = cfg.allowed_media_dir
    if root is None:
        raise APIError(400, "local image paths are disabled (start the server with --allowed-media-dir)",
                       "invalid_image")
    resolved = (root / path).resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise APIError(400, f"image path {url!r} is outside the allowed media folder", "invalid_image")
    return resolved


def build_prompt(body: ChatRequest, model, tokenizer: Tokenizer, cfg: ServeConfig):
    """(input_ids (T,), pixel_values or None) for the messages; raises APIError on anything unusable."""
    mcfg = model.cfg
    num_image_token = mcfg.num_image_token
    messages, pixels, n_images = [], [], 0
    for i, m in enumerate(body.messages):
        if m.role == "system" and i > 0:
            raise APIError(400, "a system message may only come first", param="messages")
        parts = [] if m.content is None else [m.content] if isinstance(m.content, str) else m.content
        texts, images = [], []
        for p in parts:
            if isinstance(p, str):
                texts.append(p)
            elif isinstance(p, TextPart):
                texts.append(p.text)
            else:
                images.append(p.image_url.url)
        if images and m.role != "user":
            raise APIError(400, "only user messages may carry images", param="messages")
        n_images += len(images)
        if n_images > cfg.max_images:
            raise APIError(400, f"too many images: at most {cfg.max_images} per request", "too_many_images")
        if images and mcfg.vision is None:
            raise APIError(400, "this model is a text-only LLM: it cannot take images", "invalid_image")
        tiles = []
        for url in images:
            try:
                pv = image_tiles(mcfg, _image_bytes(url, cfg), cfg.max_tiles, max_pixels=cfg.max_pixels)
            except ImageError as e:
                raise APIError(400, f"image {n_images - len(images) + len(tiles) + 1}: {e}", "invalid_image") from None
            tiles.append(len(pv))
            pixels.append(pv)
        if sum(len(p) for p in pixels) > cfg.max_total_tiles:
            raise APIError(400, f"too many image tiles: at most {cfg.max_total_tiles} per request", "too_many_tiles")
        text = "".join(texts)
        if m.role == "user":
            messages.append({"role": m.role, "content": add_image_placeholders(text, len(tiles)), "num_tiles": tiles})
        elif IMAGE_PLACEHOLDER in text:
            raise APIError(400, f"{IMAGE_PLACEHOLDER} may only appear in user messages", param="messages")
        else:
            messages.append({"role": m.role, "content": text})
    if messages[-1]["role"] != "user":
        raise APIError(400, "the last message must be the user's", param="messages")
    try:  # special tokens typed in messages stay text unless the server was started with raw special tokens
        ids = encode_messages(mcfg.template, tokenizer, messages, num_image_token=num_image_token,
                              raw_special_tokens=cfg.raw_special_tokens)
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from None
    n_tiles = sum(len(p) for p in pixels)
    if mcfg.image_token_id is not None and ids.count(mcfg.image_token_id) != num_image_token * n_tiles:
        raise APIError(400, "the messages contain image tokens that do not belong to an image", param="messages")
    return torch.tensor(ids, dtype=torch.long), (torch.cat(pixels) if pixels else None)
