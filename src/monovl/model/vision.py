"""The whole "vision encoder" of a monolithic model: a patch embedding, pixel shuffle and the `mlp1` projector."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from monovl.config import ModelConfig


class PatchEmbeddings(nn.Module):
    """Conv2d(3→C, k=s=patch) plus a learned position table, bicubically resized to the patch grid."""

    def __init__(self, image_size: int, patch_size: int, hidden: int):
        super().__init__()
        grid = image_size // patch_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, hidden))  # stored, unused: CLS is dropped
        self.patch_embedding = nn.Conv2d(3, hidden, kernel_size=patch_size, stride=patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, 1 + grid * grid, hidden))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (N, C, h, w)
        n, c, h, w = x.shape
        pos = self.position_embedding[:, 1:]  # (1, g*g, C); the CLS row is unused
        g = int(pos.shape[1] ** 0.5)
        if (g, g) != (h, w):
            pos = pos.reshape(1, g, g, c).permute(0, 3, 1, 2)  # (1, C, g, g)
            pos = F.interpolate(pos.float(), size=(h, w), mode="bicubic", align_corners=False).to(x.dtype)
            pos = pos.flatten(2).transpose(1, 2)  # (1, h*w, C)
        x = x.flatten(2).transpose(1, 2) + pos  # (N, h*w, C)
        return x.reshape(n, h, w, c)  # (N, h, w, C)


class VisionModel(nn.Module):
    """Named like the checkpoint's `vision_model` (InternVisionPatchModel): embeddings only."""

    def __init__(self, image_size: int, patch_size: int, hidden: int):
        super().__init__()
        self.embeddings = PatchEmbeddings(image_size, patch_size, hidden)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.embeddings(pixel_values)


def pixel_shuffle(x: torch.Tensor, scale: float = 0.5, version: str = "v2") -> torch.Tensor:
    """Space-to-depth on an (N, h, w, C) grid → (N, h·s, w·s, C/s²), InternVL's `v2` (or transposed `v1`)."""
    n, h, w, c = x.shape
    x = x.reshape(n, h, int(w * scale), int(c / scale))  # (N, h, w/2, 2C)
    x = x.permute(0, 2, 1, 3)  # (N, w/2, h, 2C)
    x = x.reshape(n, int(w * scale), int(h * scale), int(c / (scale * scale)))  # (N, w/2, h/2, 4C)
    if version == "v2":
        x = x.permute(0, 2, 1, 3)  # (N, h/2, w/2, 4C)
    return x.contiguous()


def make_mlp1(cfg: ModelConfig) -> nn.Sequential:
    """LN(4C) → Linear(4C→D) → GELU → Linear(D→D); indices 0, 1, 3 match the checkpoint keys."""
    c_in = cfg.vision.hidden_size * int(1 / cfg.downsample_ratio) ** 2
    d = cfg.llm.hidden_size
    return nn.Sequential(nn.LayerNorm(c_in), nn.Linear(c_in, d), nn.GELU(), nn.Linear(d, d))
