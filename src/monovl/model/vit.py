"""A modular MLLM's vision side, for `monovl bench --modular` only: an InternViT-300M-shaped encoder (pre-norm ViT,
24 layers, width 1024, 16 heads, MLP 4096, LayerNorm, layer scale, CLS token) before the same pixel shuffle and
`mlp1` projector as the monolithic model. Random weights: it exists to time what a vision encoder costs the
time to first token, at equal engineering (same PyTorch, same threads, same prefill path for the LLM).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from monovl.config import ModelConfig
from monovl.model.vision import PatchEmbeddings, make_mlp1, pixel_shuffle


class ViTLayer(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)
        self.ls1, self.ls2 = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(n, t, 3, self.heads, d // self.heads)  # (N, T, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (N, H, T, Dh)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, d)  # (N, T, D)
        x = x + self.ls1 * self.proj(o)
        return x + self.ls2 * self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ModularEncoder(nn.Module):
    """pixel_values (N, 3, S, S) → visual tokens (N, num_image_token, D) through a full ViT, as InternVL does."""

    def __init__(self, cfg: ModelConfig, layers: int = 24):
        super().__init__()
        v = cfg.vision
        heads, mlp = max(v.hidden_size // 64, 1), 4 * v.hidden_size  # 16 and 4096 at InternViT-300M's width 1024
        self.cfg = cfg
        self.embeddings = PatchEmbeddings(v.image_size, v.patch_size, v.hidden_size)
        self.layers = nn.ModuleList(ViTLayer(v.hidden_size, heads, mlp) for _ in range(layers))
        self.mlp1 = make_mlp1(cfg)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixel_values)  # (N, h, w, C)
        n, h, w, c = x.shape
        cls = self.embeddings.class_embedding.expand(n, 1, c)
        x = torch.cat([cls, x.reshape(n, h * w, c)], dim=1)  # (N, 1 + h*w, C)
        for layer in self.layers:
            x = layer(x)
        x = x[:, 1:].reshape(n, h, w, c)  # CLS dropped, as InternVL does
        x = pixel_shuffle(x, self.cfg.downsample_ratio, self.cfg.ps_version)  # (N, h/2, w/2, 4C)
        return self.mlp1(x.flatten(1, 2))  # (N, h*w/4, D)


def random_encoder(cfg: ModelConfig, seed: int = 0, std: float = 0.02, **kw) -> ModularEncoder:
    """A ModularEncoder with N(0, std²) weights (norms and layer scales 1, biases 0)."""
    enc = ModularEncoder(cfg, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if p.dim() == 1:
                p.fill_(0.0 if name.endswith("bias") else 1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return enc.eval()
