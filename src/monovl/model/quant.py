"""Weight-only int8: per-output-channel symmetric int8 weights, activations in the model's float dtype.

`quantize(model, "int8")` replaces every `nn.Linear` of the decoder (text and visual experts alike), the output
head and the token embeddings by int8 modules; norms and the vision part (patch embedding, `mlp1`) stay float.
A weight row w (K,) is stored as q = round(w / s) in [-127, 127] with s = max|w| / 127, and a linear computes
x @ (q * s)ᵀ (+ bias) with x left in float — the reference that the tests hold every backend to.

Two PyTorch kernels compute it:
- `int8pack`: `torch.ops.aten._weight_int8pack_mm` (weight-only int8, float activations): on CUDA and on CPUs
  whose build vectorises it (AVX-512). On an AVX2 CPU it runs a scalar loop, measured 3-5× slower than an fp32
  GEMV here.
- `fbgemm` (x86 CPUs without AVX-512): fbgemm's int8 GEMM (`quantized::linear_dynamic`) fed with activations that
  are split exactly into two 7-bit integer rows each, x ≈ a · (hi + lo / 126) with a = max|x| / 63 per row,
  plus one row holding -64 and 63 so that fbgemm's per-tensor input scale is exactly 1 (zero point 64) and
  quantizes the integers without loss. The result a · (y_hi + y_lo / 126) equals the reference to ~2e-4 of
  its largest value (activations carried at ~14 bits; int32 accumulation is exact), and the weights are read
  once per call.
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn

METHODS = ("int8",)


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float → (q (N, K) int8, scale (N,) fp32), symmetric per row; an all-zero row gets scale 1."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def pick_backend(device: torch.device) -> str:
    """The faster of PyTorch's int8 kernels for `device` (see the module docstring)."""
    device = torch.device(device)
    if device.type != "cpu" or torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return "int8pack"
    return "fbgemm" if "fbgemm" in torch.backends.quantized.supported_engines else "int8pack"


def _split_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) → (rows (2M + 1, K) fp32 of integers in [-64, 63], a (M, 1)): x ≈ a · (hi + lo / 126)."""
    a = x.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-30) / 63  # (M, 1)
    scaled = x / a  # |scaled| ≤ 63
    hi = scaled.round()
    lo = (scaled - hi).mul_(126).round_()  # |lo| ≤ 63
    edge = torch.zeros(1, x.shape[1], dtype=torch.float32, device=x.device)
    edge[0, 0], edge[0, -1] = -64, 63  # fixes fbgemm's per-tensor input range to [-64, 63]: scale 1, zero point 64
    return torch.cat([hi, lo, edge]), a


class QuantLinear(nn.Module):
    """y = x @ (weight * weight_scale[:, None])ᵀ + bias, weight (N, K) int8; x keeps its float dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool, backend: str = "int8pack",
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self._packed = None  # fbgemm's packed copy of the weight, which then replaces `weight`

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: str) -> "QuantLinear":
        w = linear.weight
        m = cls(w.shape[1], w.shape[0], linear.bias is not None, backend, w.dtype, w.device)
        m.set_int8(*quantize_rows(w))
        if linear.bias is not None:
            m.bias = linear.bias.detach().clone()
        return m

    def set_int8(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        """Take the int8 weight (N, K) and its scales (N,); on fbgemm, pack them (the int8 copy is dropped)."""
        self.weight, self.weight_scale, self._packed = q, scale.float(), None
        if self.backend == "fbgemm":
            zero = torch.zeros(q.shape[0], dtype=torch.long)
            with warnings.catch_warnings():  # quantized tensors are deprecated as a user API; the kernel is not
                warnings.simplefilter("ignore")
                qw = torch._make_per_channel_quantized_tensor(q.cpu(), scale.double().cpu(), zero, 0)
                self._packed = torch.ops.quantized.linear_prepack(qw, None)
            self.weight = torch.empty(0, dtype=torch.int8)

    def int8_weight(self) -> torch.Tensor:
        """The (N, K) int8 weight, unpacked from fbgemm's copy when needed."""
        if self._packed is None:
            return self.weight
        return torch.ops.quantized.linear_unpack(self._packed)[0].int_repr()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.in_features)  # (M, K)
        if self._packed is not None:
            rows, a = _split_rows(flat)
            y = torch.ops.quantized.linear_dynamic(rows, self._packed, True)  # (2M + 1, N)
            m = flat.shape[0]
            y = torch.add(y[:m], y[m: 2 * m], alpha=1 / 126).mul_(a).to(x.dtype)
        else:
            y = torch.ops.aten._weight_int8pack_mm(flat.contiguous(), self.weight, self.weight_scale.to(x.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend}"


class QuantEmbedding(nn.Module):
    """Embedding rows stored as int8 with one scale per row; a lookup dequantizes the rows it reads."""

    def __init__(self, num_embeddings: int, dim: int, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.dtype = num_embeddings, dim, dtype
        self.register_buffer("weight", torch.zeros(num_embeddings, dim, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(num_embeddings, dtype=torch.float32, device=device))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> "QuantEmbedding":
        m = cls(emb.num_embeddings, emb.embedding_dim, emb.weight.dtype, emb.weight.device)
        m.set_int8(*quantize_rows(emb.weight))
        return m

    def set_int8(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        self.weight, self.weight_scale = q, scale.float()

    def int8_weight(self) -> torch.Tensor:
        return self.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight).to(self.dtype)  # (..., D)
        return rows * F.embedding(ids, self.weight_scale[:, None]).to(self.dtype)


QUANT_MODULES = (QuantLinear, QuantEmbedding)


def quantized_names(model: nn.Module) -> list[str]:
    """Names of the model's int8 modules."""
    return [n for n, m in model.named_modules() if isinstance(m, QUANT_MODULES)]


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights as held: parameters, buffers, and fbgemm's packed int8 copies (counted as N·K)."""
    tensors = list(model.parameters()) + list(model.buffers())
    packed = sum(m.in_features * m.out_features for m in model.modules()
                 if isinstance(m, QuantLinear) and m._packed is not None)
    return sum(t.numel() * t.element_size() for t in tensors) + packed


def _targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The decoder's linears and embeddings, the output head included; nothing of the vision part."""
    lm = model.language_model if hasattr(model, "language_model") else model
    prefix = "language_model." if lm is not model else ""
    return [(prefix + n, m) for n, m in lm.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]


def quantize(model: nn.Module, method: str = "int8", backend: str | None = None) -> nn.Module:
    """Replace the decoder's linears, head and embeddings by int8 modules, in place; return the model.

    The model should already be on its final device: fbgemm's packed weights do not move with `.to()`."""
    if method not in METHODS:
        raise ValueError(f"unknown quantization {method!r} (known: {', '.join(METHODS)})")
    for name, module in _targets(model):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if isinstance(module, nn.Linear):
            new = QuantLinear.from_linear(module, backend or pick_backend(module.weight.device))
        else:
            new = QuantEmbedding.from_embedding(module)
        setattr(parent, attr, new)
    if hasattr(model, "cfg"):
        model.cfg.quantization = method  # so that `save_model` writes a quantized checkpoint
    return model


def quantized_copy(model: nn.Module, method: str = "int8", backend: str | None = None) -> nn.Module:
    """An int8 copy of `model` that shares its float parameters (norms, vision) instead of copying them, so that
    both fit in memory at once (the benchmark's side-by-side runs); `model` itself is left as it was."""
    shared = {id(p): p for p in model.parameters()}
    return quantize(copy.deepcopy(model, memo=shared), method, backend)


def empty_quantized(model: nn.Module, method: str = "int8", backend: str = "int8pack",
                    dtype: torch.dtype = torch.float32) -> nn.Module:
    """Like `quantize`, without computing anything (meta stays meta): the int8 modules wait for `set_int8` (the
    checkpoint loader); `dtype` is the float dtype of the activations, embeddings and biases."""
    if method not in METHODS:
        raise ValueError(f"unknown quantization {method!r} (known: {', '.join(METHODS)})")
    for name, module in _targets(model):
        parent_name, _, attr = name.rpartition(".")
        w = module.weight
        if isinstance(module, nn.Linear):
            new = QuantLinear(w.shape[1], w.shape[0], module.bias is not None, backend, dtype, w.device)
        else:
            new = QuantEmbedding(w.shape[0], w.shape[1], dtype, w.device)
        setattr(model.get_submodule(parent_name), attr, new)
    return model
