"""Generation: one prefill over the (right-padded) prompts, then one token per step from the static KV cache.

The core, as in gpt-fast, is three functions that every caller (generate, chat, eval, the serving engine, the
speed benchmark) goes through: `embed_prompt` (token embeddings with image features placed, once per prompt),
`prefill` (the prompt, or a chunk of it, into the cache → logits of one position per row) and
`decode_one_token` (one token per row → next logits). `model.forward` stays the whole-sequence parity surface.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from numbers import Integral

import torch


def _as_rows(input_ids) -> list[torch.Tensor]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        return list(input_ids)
    return [torch.as_tensor(r, dtype=torch.long) for r in input_ids]


def sample_next(logits: torch.Tensor, seen: torch.Tensor | None, *, temperature: float, top_p: float, top_k: int,
                repetition_penalty: float, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) → next tokens (B,). Order as in Hugging Face: penalty, temperature, top-k, top-p."""
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(logits < 0, logits * repetition_penalty, logits / repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if temperature <= 0 or float(torch.tensor(temperature, dtype=logits.dtype)) == 0:  # 0 in fp32: greedy
        return logits.argmax(-1)
    # Shifted so the best logit is 0: a tiny temperature turns the others into -inf, never inf/inf = NaN.
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix whose mass reaches top_p
        drop[:, 0] = False  # and always the best token, however small top_p is (rounding in cum)
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def embed_prompt(model, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None):
    """input_ids (B, T) → (embeddings (B, T, D), visual_mask (B, T)), image features on the <IMG_CONTEXT> rows."""
    return model.embed(input_ids, pixel_values)


def prefill(model, embeds, cache, input_pos: torch.Tensor, last: torch.Tensor,
            cache_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Write `embeds` (a slice of `embed_prompt`'s output) at positions input_pos (B, T) of the cache rows
    `cache_rows` (B,) (default 0..B-1); return the logits (B, V) at position `last` (B,) of each row."""
    x, visual_mask = embeds
    logits = model.language_model(x, visual_mask, input_pos=input_pos, cache=cache, logits_at=last,
                                  cache_rows=cache_rows)
    return logits[:, 0]  # (B, V)


def decode_one_token(model, tokens: torch.Tensor, input_pos: torch.Tensor, cache,
                     cache_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Feed tokens (B,) at positions input_pos (B,) of the cache rows `cache_rows`; return the next logits (B, V)."""
    return model(tokens[:, None], input_pos=input_pos[:, None], cache=cache, cache_rows=cache_rows)[:, 0]


@torch.inference_mode()
def stream_generate(model, input_ids, pixel_values: torch.Tensor | None = None, *, max_new_tokens: int = 256,
                    temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
                    stop_token_ids: Sequence[int] | None = None, seed: int | None = None,
                    pad_token_id: int | None = None, cache=None, cached: int = 0) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,), until all rows stopped or `max_new_tokens`.

    `input_ids` is a (B, T) tensor or a list of 1-D id sequences of different lengths; `pixel_values` holds the
    tiles of all images of all rows, in order. A row that has stopped yields `pad_token_id` afterwards.
    Prefix reuse (one row): `cache` (from `model.new_cache(1, ≥ T + max_new_tokens)`) whose first `cached`
    positions already hold the keys and values of input_ids[:cached]; only the rest is prefilled, and
    `pixel_values` then holds the tiles of the images in input_ids[cached:] only.
    """
    rows = _as_rows(input_ids)
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, Integral) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens = {max_new_tokens!r}: must be a whole number >= 0")
    device = next(model.parameters()).device
    pad = model.cfg.llm.pad_token_id if pad_token_id is None else pad_token_id
    lengths = torch.tensor([len(r) for r in rows], device=device)  # (B,)
    b, t = len(rows), int(lengths.max())
    ids = torch.full((b, t), pad, dtype=torch.long, device=device)  # right-padded (B, T)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r.to(device)
    stop = torch.tensor(sorted(set(stop_token_ids or [])), dtype=torch.long, device=device)
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(b, model.cfg.llm.vocab_size, dtype=torch.bool, device=device)  # real tokens only
        for i, r in enumerate(rows):
            seen[i, r.to(device)] = True
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    sample = dict(temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
                  generator=generator)

    if cache is None:
        cache, cached = model.new_cache(b, t + max_new_tokens), 0
    elif b != 1 or not 0 <= cached < t or cache.max_len < t + max_new_tokens:
        raise ValueError(f"a given cache needs one prompt, 0 <= cached < {t} and room for {t + max_new_tokens}")
    input_pos = torch.arange(cached, t, device=device).expand(b, t - cached)  # (B, T - cached)
    pv = pixel_values.to(device) if pixel_values is not None else None
    logits = prefill(model, embed_prompt(model, ids[:, cached:], pv), cache, input_pos, lengths - 1 - cached)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        tok = sample_next(logits, seen, **sample)  # (B,)
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        yield tok
        done |= torch.isin(tok, stop)
        if step + 1 == max_new_tokens or bool(done.all()):
            return
        if seen is not None:
            seen[torch.arange(b, device=device), tok] = True
        logits = decode_one_token(model, tok, lengths + step, cache)  # (B, V); lengths + step: next free slots


def generate(model, input_ids, pixel_values: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """New tokens only, (B, n); greedy when temperature is 0. Keyword arguments as `stream_generate`."""
    steps = list(stream_generate(model, input_ids, pixel_values, **kwargs))
    if not steps:
        return torch.empty(len(_as_rows(input_ids)), 0, dtype=torch.long)
    return torch.stack(steps, dim=1)
