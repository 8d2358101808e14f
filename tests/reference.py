"""A deliberately plain float64 reference of the Mono-InternVL forward pass, written from design.md §1/§2.

Independent of `monovl.model`: loops over tiles, heads and tokens, no fused kernels, no cache. Used only
to check the real implementation on tiny checkpoints (see tests/spec_checkpoint.py).

    logits = reference_logits(state_dict, config, input_ids, pixel_values, image_token_id=img_id)

`state_dict` is keyed by checkpoint names; `config` is the full config.json dict (InternVLChatModel).
Facts checked against the official HF code (OpenGVLab Mono-InternVL, modeling_intern_patch.py,
modeling_internvl_chat.py, modeling_internlm2_ve.py):
- vision: embeddings = cat(class_embedding, patch tokens) + cat(pos[:, :1], bicubic(pos[:, 1:] -> grid)),
  then the CLS row is dropped (`[:, 1:]`); select_layer -1 is that output.
- pixel shuffle v2 / v1 as §2; mlp1 = LayerNorm(1e-5) -> Linear -> GELU(erf) -> Linear.
- decoder: wqkv rows (kv_heads, n_rep + 2, head_dim); RoPE rotate_half on cat(freqs, freqs);
  dynamic NTK base = theta * (f * T / max_pos - (f - 1)) ** (hd / (hd - 2)) when T > max_pos.
"""

import math

import torch
import torch.nn.functional as F

DT = torch.float64


def _w(state_dict, key):
    return state_dict[key].to(DT)  # a no-op after the float64 conversion at each entry point


def _linear(x, weight, bias=None):
    y = x @ weight.T
    return y if bias is None else y + bias


def _layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased variance, as nn.LayerNorm
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _gelu_erf(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _rms_norm(x, weight, eps):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def pixel_shuffle_reference(grid, downsample_ratio=0.5, ps_version="v2"):
    """(h, w, C) grid -> (h/k, w/k, k*k*C) for v2, (w/k, h/k, k*k*C) for v1 (transposed), k = 1/ratio.

    Output cell (i, j) (v2) concatenates, row-major over (di, dj), the input cells (k*i + di, k*j + dj).
    Written as explicit index loops, on purpose not as the view/permute sequence of §2.
    """
    k = round(1 / downsample_ratio)
    h, w, c = grid.shape
    if h % k or w % k:
        raise ValueError(f"grid {h}x{w} not divisible by {k}")
    out = torch.empty(h // k, w // k, k * k * c, dtype=grid.dtype)
    for i in range(h // k):
        for j in range(w // k):
            out[i, j] = torch.cat([grid[k * i + di, k * j + dj] for di in range(k) for dj in range(k)])
    if ps_version == "v1":
        return out.transpose(0, 1)  # v1 omits the final permute: (w/k, h/k, k*k*C)
    if ps_version != "v2":
        raise ValueError(f"unknown ps_version {ps_version!r}")
    return out


def reference_vision_features(state_dict, config, pixel_values):
    """(N, 3, H, W) tiles -> (N, (H/p/k)*(W/p/k), D) float64 image features (before the LLM)."""
    state_dict = {key: t.to(DT) for key, t in state_dict.items()}
    if config.get("select_layer", -1) != -1:
        raise ValueError("only select_layer -1 is specified")
    pre = "vision_model.embeddings."
    conv_w, conv_b = _w(state_dict, pre + "patch_embedding.weight"), _w(state_dict, pre + "patch_embedding.bias")
    cls = _w(state_dict, pre + "class_embedding")  # (1, 1, C)
    pos = _w(state_dict, pre + "position_embedding")  # (1, 1 + g0*g0, C)
    c = conv_w.shape[0]
    p = config["vision_config"]["patch_size"]
    g0 = config["vision_config"]["image_size"] // p
    assert pos.shape == (1, 1 + g0 * g0, c), pos.shape
    feats = []
    for n in range(pixel_values.shape[0]):
        x = F.conv2d(pixel_values[n : n + 1].to(DT), conv_w, conv_b, stride=p)  # (1, C, h, w)
        h, w = x.shape[-2:]
        patches = x[0].reshape(c, h * w).T  # (h*w, C), row-major over the grid
        table = pos[0, 1:].reshape(g0, g0, c).permute(2, 0, 1)[None]  # (1, C, g0, g0)
        if (h, w) != (g0, g0):
            table = F.interpolate(table, size=(h, w), mode="bicubic", align_corners=False)
        patch_pos = table[0].reshape(c, h * w).T  # (h*w, C)
        tokens = torch.cat([cls[0], patches]) + torch.cat([pos[0, :1], patch_pos])  # (1 + h*w, C)
        grid = tokens[1:].reshape(h, w, c)  # drop CLS
        shuffled = pixel_shuffle_reference(grid, config["downsample_ratio"], config["ps_version"])
        v = shuffled.reshape(-1, shuffled.shape[-1])  # (tokens, 4C)
        v = _layer_norm(v, _w(state_dict, "mlp1.0.weight"), _w(state_dict, "mlp1.0.bias"), 1e-5)
        v = _linear(v, _w(state_dict, "mlp1.1.weight"), _w(state_dict, "mlp1.1.bias"))
        v = _gelu_erf(v)
        v = _linear(v, _w(state_dict, "mlp1.3.weight"), _w(state_dict, "mlp1.3.bias"))
        feats.append(v)
    return torch.stack(feats)


def rope_cos_sin(llm_config, seq_len):
    """cos, sin of shape (seq_len, head_dim) for positions 0..seq_len-1 (InternLM2 rotate_half layout)."""
    hd = llm_config["hidden_size"] // llm_config["num_attention_heads"]
    base = float(llm_config["rope_theta"])
    positions = torch.arange(seq_len, dtype=DT)
    scaling = llm_config.get("rope_scaling")
    if scaling is not None:
        kind = scaling.get("type", scaling.get("rope_type"))
        factor = float(scaling["factor"])
        max_pos = llm_config["max_position_embeddings"]
        if kind == "linear":
            positions = positions / factor
        elif kind == "dynamic":
            if seq_len > max_pos:
                base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (hd / (hd - 2))
        else:
            raise ValueError(f"unknown rope_scaling type {kind!r}")
    inv_freq = 1.0 / base ** (torch.arange(0, hd, 2, dtype=DT) / hd)  # (hd/2,)
    freqs = positions[:, None] * inv_freq[None, :]  # (T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, hd)
    return emb.cos(), emb.sin()


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _ffn(x, state_dict, pre):
    gate = _linear(x, _w(state_dict, pre + ".w1.weight"))
    up = _linear(x, _w(state_dict, pre + ".w3.weight"))
    return _linear(gate * torch.sigmoid(gate) * up, _w(state_dict, pre + ".w2.weight"))


def _attention(x, visual, state_dict, pre, llm_config, cos, sin, attention_experts):
    """x: (T, D) normed input of one sequence; visual: (T,) bool. One causal attention over all tokens."""
    d, heads, kv_heads = (llm_config["hidden_size"], llm_config["num_attention_heads"],
                          llm_config["num_key_value_heads"])
    hd, n_rep = d // heads, heads // kv_heads
    t_len = x.shape[0]
    q = torch.empty(heads, t_len, hd, dtype=DT)
    k = torch.empty(kv_heads, t_len, hd, dtype=DT)
    v = torch.empty(kv_heads, t_len, hd, dtype=DT)
    for t in range(t_len):
        name = "attention_ve" if attention_experts and visual[t] else "attention"
        qkv = _linear(x[t], _w(state_dict, f"{pre}.{name}.wqkv.weight"))  # ((heads + 2*kv) * hd,)
        groups = qkv.reshape(kv_heads, n_rep + 2, hd)
        for g in range(kv_heads):
            for r in range(n_rep):
                q[g * n_rep + r, t] = groups[g, r]
            k[g, t] = groups[g, n_rep]
            v[g, t] = groups[g, n_rep + 1]
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    causal = torch.ones(t_len, t_len, dtype=torch.bool).tril()
    out = torch.empty(t_len, heads * hd, dtype=DT)
    for head in range(heads):
        g = head // n_rep
        scores = q[head] @ k[g].T / math.sqrt(hd)  # (T, T)
        scores = scores.masked_fill(~causal, float("-inf"))
        out[:, head * hd : (head + 1) * hd] = torch.softmax(scores, dim=-1) @ v[g]
    y = torch.empty(t_len, d, dtype=DT)
    for t in range(t_len):
        name = "attention_ve" if attention_experts and visual[t] else "attention"
        y[t] = _linear(out[t], _w(state_dict, f"{pre}.{name}.wo.weight"))
    return y


def reference_logits(state_dict, config, input_ids, pixel_values=None, image_token_id=None):
    """(B, T) ids [+ (N, 3, H, W) tiles] -> (B, T, V) float64 logits.

    Image features of all tiles, in order, replace the rows whose id is `image_token_id`, in row-major
    (b, t) order; those tokens (and only those) go through the visual experts.
    """
    state_dict = {key: t.to(DT) for key, t in state_dict.items()}
    llm = config["llm_config"]
    eps = llm["rms_norm_eps"]
    attention_experts = bool(llm.get("visual_attention_experts", False))
    input_ids = torch.as_tensor(input_ids)
    bsz, t_len = input_ids.shape
    if image_token_id is None:
        if pixel_values is not None:
            raise ValueError("pixel_values given without image_token_id")
        visual = torch.zeros(bsz, t_len, dtype=torch.bool)
    else:
        visual = input_ids == image_token_id  # (B, T)

    x = _w(state_dict, "language_model.model.tok_embeddings.weight")[input_ids]  # (B, T, D)
    if pixel_values is not None:
        feats = reference_vision_features(state_dict, config, pixel_values)
        feats = feats.reshape(-1, feats.shape[-1])  # (N * tokens, D)
        if feats.shape[0] != int(visual.sum()):
            raise ValueError(f"{feats.shape[0]} image features for {int(visual.sum())} image tokens")
        row = 0
        for b in range(bsz):
            for t in range(t_len):
                if visual[b, t]:
                    x[b, t] = feats[row]
                    row += 1
    elif visual.any():
        raise ValueError("image tokens in input_ids but no pixel_values")

    cos, sin = rope_cos_sin(llm, t_len)
    for i in range(llm["num_hidden_layers"]):
        pre = f"language_model.model.layers.{i}"
        for b in range(bsz):
            h = _rms_norm(x[b], _w(state_dict, pre + ".attention_norm.weight"), eps)
            attn = _attention(h, visual[b], state_dict, pre, llm, cos, sin, attention_experts)
            x[b] = x[b] + attn
            h = _rms_norm(x[b], _w(state_dict, pre + ".ffn_norm.weight"), eps)
            for t in range(t_len):
                expert = "feed_forward_ve" if visual[b, t] else "feed_forward"
                x[b, t] = x[b, t] + _ffn(h[t], state_dict, f"{pre}.{expert}")
    x = _rms_norm(x, _w(state_dict, "language_model.model.norm.weight"), eps)
    return _linear(x, _w(state_dict, "language_model.output.weight"))
