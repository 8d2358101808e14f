"""Mono-InternVL: a patch embedding feeding a Llama-style decoder (InternLM2, Qwen, Llama) with visual experts."""
from __future__ import annotations

import os

import torch
from torch import nn

from monovl.config import ModelConfig
from monovl.model.decoder import CausalLM
from monovl.model.kv_cache import KVCache
from monovl.model.vision import VisionModel, make_mlp1, pixel_shuffle


class MonoInternVL(nn.Module):
    """Parameter names equal the release checkpoint's: `vision_model.*`, `mlp1.*`, `language_model.*`.
    With `cfg.vision` None it is a plain text LLM (a *ForCausalLM checkpoint under `language_model.`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.vision is not None:
            v = cfg.vision
            self.vision_model = VisionModel(v.image_size, v.patch_size, v.hidden_size)
            self.mlp1 = make_mlp1(cfg)
        self.language_model = CausalLM(cfg.llm)

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (N, 3, S, S) → visual tokens (N, num_image_token, D)."""
        x = self.vision_model(pixel_values)  # (N, h, w, C)
        x = pixel_shuffle(x, self.cfg.downsample_ratio, self.cfg.ps_version)  # (N, h/2, w/2, 4C)
        return self.mlp1(x.flatten(1, 2))  # (N, h*w/4, D)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None):
        """Token embeddings with image features placed, in order, on the <IMG_CONTEXT> rows → ((B, T, D), mask)."""
        x = self.language_model.embed_tokens(input_ids)  # (B, T, D)
        image_id = self.cfg.image_token_id
        visual_mask = input_ids == (image_id if image_id is not None else -1)  # (B, T)
        if pixel_values is not None and len(pixel_values):
            if self.cfg.vision is None or image_id is None:
                raise ValueError("pixel_values given, but this model has no vision part or no <IMG_CONTEXT> id")
            feats = self.extract_feature(pixel_values)  # (N, t, D)
            n_slots = int(visual_mask.sum())
            if n_slots != feats.shape[0] * feats.shape[1]:
                raise ValueError(f"the prompt has {n_slots} <IMG_CONTEXT> tokens but the images give "
                                 f"{feats.shape[0]} tiles × {feats.shape[1]} = {feats.shape[0] * feats.shape[1]}")
            x = x.masked_scatter(visual_mask[..., None], feats.to(x.dtype))
        elif input_ids.shape[1] > 1 and bool(visual_mask.any()):
            raise ValueError("the prompt has <IMG_CONTEXT> tokens but no pixel_values were given")
        return x, visual_mask

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, *,
                input_pos: torch.Tensor | None = None, cache: KVCache | None = None,
                logits_at: torch.Tensor | None = None, dense: bool = False,
                cache_rows: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                loss_chunk: int = 0) -> torch.Tensor:
        """input_ids (B, T) → logits (B, T, V) (or (B, 1, V) with `logits_at`); with `labels` (B, T), the summed
        next-token cross-entropy, logits computed only where a label is. See CausalLM."""
        x, visual_mask = self.embed(input_ids, pixel_values)
        return self.language_model(x, visual_mask, input_pos=input_pos, cache=cache, logits_at=logits_at,
                                   dense=dense, cache_rows=cache_rows, labels=labels, loss_chunk=loss_chunk)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """A KV cache of `batch` rows × `max_len` positions; a ValueError when it cannot fit the device's memory
        (checked before allocating: a huge token budget must not start filling the machine's RAM)."""
        p, c = self.language_model.model.norm.weight, self.cfg.llm  # float, also when the linears are int8
        need = 2 * c.num_hidden_layers * batch * c.num_key_value_heads * max_len * c.head_dim * p.element_size()
        have = _memory_bytes(p.device)
        too_big = f"the KV cache of {batch} × {max_len} positions needs {need / 2**30:.1f} GiB"
        if have is not None and need > have:
            raise ValueError(f"{too_big}, more than the {have / 2**30:.1f} GiB of {p.device}: ask for fewer tokens")
        try:
            return KVCache(c, batch, max_len, p.dtype, p.device)
        except RuntimeError as e:  # torch.OutOfMemoryError too
            raise ValueError(f"{too_big}, which {p.device} cannot allocate ({str(e).splitlines()[0]}): ask for "
                             "fewer tokens") from None


def _memory_bytes(device: torch.device) -> int | None:
    """All the memory of `device` (not what is free), or None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    if device.type == "cpu" and hasattr(os, "sysconf"):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None
    return None
