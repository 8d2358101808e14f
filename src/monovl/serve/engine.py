"""The serving engine: continuous batching over a fixed pool of KV-cache slots, in one background thread.

One `KVCache(cfg, max_batch, max_len)` holds every running request: slot i is cache row i. Each step
  1. drops finished, cancelled and timed-out requests (their slots become free) and admits queued ones;
  2. prefills at most `prefill_chunk` prompt tokens of ONE request (the oldest still prefilling), so a long
     image prompt is spread over several steps instead of stalling everyone's decoding;
  3. runs one decode step for every request that has a token to feed, as one batch over their cache rows.
With a prefix cache (`prefix_cache_bytes`), a finished request leaves the keys and values of its prompt and
answer behind (`serve.prefix_cache`), and a new request whose prompt starts with them (the next turn of the same
chat) copies them into its slot and prefills only the rest.
Tokens travel to the caller through each request's `on_event` callback, from the engine thread. Sampling
goes through `monovl.generation`'s core (`embed_prompt`, `prefill`, `decode_one_token`, `sample_next` per
request), so greedy answers equal `monovl.generate` on the request alone.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from monovl.generation import decode_one_token, embed_prompt, prefill, sample_next
from monovl.serve.prefix_cache import PrefixCache

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The engine's waiting queue is full; retry later."""


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # generate exactly max_tokens (load tests)


@dataclass(eq=False)
class Request:
    """One generation. `on_event(kind, value)` receives ("token", id), then ("done", finish_reason:
    "stop" | "length" | "cancelled") or ("error", message); it is called from the engine thread."""
    input_ids: torch.Tensor  # (T,)
    pixel_values: torch.Tensor | None  # (N, 3, S, S), all tiles of all images of the prompt
    params: SamplingParams
    on_event: Callable[[str, object], None]
    deadline: float = float("inf")  # time.monotonic() after which the request fails with a timeout
    id: int = field(default_factory=itertools.count().__next__)
    cancelled: bool = False
    # engine state
    slot: int | None = None
    embeds: tuple[torch.Tensor, torch.Tensor] | None = None  # embeddings (1, T', D), visual mask (1, T')
    embeds_from: int = 0  # the prompt position of embeds' first row (after a reused prefix)
    prefilled: int = 0  # prompt tokens already in the cache
    tokens: list[int] = field(default_factory=list)  # sampled so far
    pending: int | None = None  # sampled token not yet fed to the model
    generated: int = 0
    generator: torch.Generator | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.input_ids)


class Engine:
    """Continuous-batching generation over `model` (a MonoInternVL) in a background thread."""

    def __init__(self, model, *, max_batch: int = 8, max_len: int = 4096, max_queue: int = 64,
                 prefill_chunk: int = 512, prefix_cache_bytes: int = 0):
        self.model, self.max_batch, self.max_len, self.max_queue = model, max_batch, max_len, max_queue
        self.prefix = PrefixCache(prefix_cache_bytes, model.cfg.image_token_id, model.cfg.num_image_token) \
            if prefix_cache_bytes > 0 else None
        self.prefill_chunk = prefill_chunk
        self.device = next(model.parameters()).device
        self.cache = model.new_cache(max_batch, max_len)
        self.slots: list[Request | None] = [None] * max_batch
        self.waiting: deque[Request] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.tokens_generated = 0  # all requests, ever
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the last steps, for tokens/s

    # -- caller side (any thread) -------------------------------------------------------------------
    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._run, name="monovl-engine", daemon=True)
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request: Request) -> Request:
        if request.prompt_len == 0:
            raise ValueError("the prompt is empty")
        if request.prompt_len >= self.max_len:
            raise ValueError(f"the prompt has {request.prompt_len} tokens; this server's context is {self.max_len}")
        with self._cond:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (max_queue={self.max_queue})")
            self.waiting.append(request)
            self._cond.notify_all()
        return request

    def cancel(self, request: Request) -> None:
        """Stop `request` at the next step boundary and free its slot (idempotent)."""
        request.cancelled = True
        with self._cond:
            self._cond.notify_all()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.slots)

    def tokens_per_second(self, window: float = 5.0) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self._recent) if now - t <= window]
        return sum(n for _, n in recent) / window if recent else 0.0

    # -- engine thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stop and not self.waiting and self.active == 0:
                        self._cond.wait()
                    if self._stop:
                        break
                try:
                    self.step()
                except Exception:  # a bug must fail the running requests, not kill the server
                    log.exception("engine step failed")
                    for r in self.slots:
                        if r is not None:
                            self._finish(r, "error", "internal error in the generation engine")
        for r in [*self.slots, *self.waiting]:
            if r is not None:
                self._finish(r, "error", "the server is shutting down")

    def step(self) -> None:
        """One scheduling step: free and admit slots, one prefill chunk, one batched decode."""
        now = time.monotonic()
        for r in [r for r in self.slots if r is not None]:
            if r.cancelled:
                self._finish(r, "done", "cancelled")
            elif now > r.deadline:
                self._finish(r, "error", "request timed out")
        with self._cond:
            for r in list(self.waiting):
                if r.cancelled or now > r.deadline:
                    self.waiting.remove(r)
                    self._finish(r, *(("done", "cancelled") if r.cancelled else ("error", "request timed out")))
            while self.waiting and None in self.slots:
                r = self.waiting.popleft()
                r.slot = self.slots.index(None)
                self.slots[r.slot] = r
        prefilling = [r for r in self.slots if r is not None and r.pending is None]
        if prefilling:
            self._prefill_chunk(min(prefilling, key=lambda r: r.id))
        decoding = [r for r in self.slots if r is not None and r.pending is not None]
        if decoding:
            self._decode(decoding)

    def _prefill_chunk(self, r: Request) -> None:
        try:
            if r.embeds is None:
                self._start_prefill(r)
            x, visual_mask = r.embeds
            a = r.prefilled
            b = min(r.prompt_len, a + self.prefill_chunk)
            pos = torch.arange(a, b, device=self.device)[None]  # (1, b - a)
            rows = slice(a - r.embeds_from, b - r.embeds_from)
            logits = prefill(self.model, (x[:, rows], visual_mask[:, rows]), self.cache, pos,
                             torch.tensor([b - a - 1], device=self.device),
                             cache_rows=torch.tensor([r.slot], device=self.device))  # (1, V)
        except (ValueError, RuntimeError) as e:
            self._finish(r, "error", f"cannot run this prompt: {e}")
            return
        except Exception:  # a bug met by this prompt ends this request, not the others
            log.exception("request %d: prefill failed", r.id)
            self._finish(r, "error", "internal error in the generation engine")
            return
        r.prefilled = b
        if b == r.prompt_len:
            r.embeds = None
            self._accept(r, logits)

    def _start_prefill(self, r: Request) -> None:
        """Reuse the longest cached prefix (copied into r's slot), then embed the rest of the prompt."""
        n, pv = 0, r.pixel_values
        if self.prefix is not None:
            entry, n = self.prefix.lookup(r.input_ids)
            if entry is not None:
                self.cache.k[:, r.slot, :, :n] = entry.k[:, :, :n]
                self.cache.v[:, r.slot, :, :n] = entry.v[:, :, :n]
                image_id, per_tile = self.model.cfg.image_token_id, max(self.model.cfg.num_image_token, 1)
                done = int((r.input_ids[:n] == image_id).sum()) // per_tile if image_id is not None else 0
                pv = pv[done:] if pv is not None and done < len(pv) else None
        ids = r.input_ids[n:].to(self.device)[None]  # (1, T - n)
        r.embeds = embed_prompt(self.model, ids, pv.to(self.device) if pv is not None else None)
        r.prefilled = r.embeds_from = n
        if r.params.seed is not None:
            r.generator = torch.Generator(self.device).manual_seed(r.params.seed)

    def _keep_prefix(self, r: Request) -> None:
        """Leave the keys and values of r's prompt and answer (all but its last token, never fed) to the cache."""
        n = r.prompt_len + len(r.tokens) - 1
        ids = torch.cat([r.input_ids, torch.tensor(r.tokens[:-1], dtype=torch.long)])
        self.prefix.insert(ids, self.cache.k[:, r.slot, :, :n], self.cache.v[:, r.slot, :, :n])

    def _forward(self, batch: Sequence[Request]) -> torch.Tensor:
        tok = torch.tensor([r.pending for r in batch], device=self.device)  # (B,)
        pos = torch.tensor([r.prompt_len + r.generated - 1 for r in batch], device=self.device)  # (B,)
        rows = torch.tensor([r.slot for r in batch], device=self.device)  # (B,)
        return decode_one_token(self.model, tok, pos, self.cache, cache_rows=rows)  # (B, V)

    def _decode(self, batch: Sequence[Request]) -> None:
        """One decode step for `batch`. If the batched forward fails, each request is retried alone (writing the
        same cache positions again), so that only the requests whose own forward fails are ended."""
        try:
            logits = self._forward(batch)
        except Exception as e:
            log.warning("batched decode of %d requests failed (%s); retrying them one by one", len(batch), e)
            for r in batch:
                try:
                    logits = self._forward([r])
                except Exception:
                    log.exception("request %d: decode failed", r.id)
                    self._finish(r, "error", "internal error in the generation engine")
                    continue
                self._accept(r, logits)
            return
        greedy = logits.argmax(-1).tolist()  # one host sync for every greedy row
        for i, r in enumerate(batch):
            self._accept(r, logits[i : i + 1], greedy[i] if r.params.temperature <= 0 else None)
        self._recent.append((time.monotonic(), len(batch)))
        while len(self._recent) > 10_000:
            self._recent.popleft()

    def _accept(self, r: Request, logits: torch.Tensor, tok: int | None = None) -> None:
        """Sample r's next token from logits (1, V) (unless given), emit it, and stop r when it is done.
        A sampling failure (e.g. non-finite logits) ends r alone, never the other requests of the batch."""
        p = r.params
        if tok is None:
            try:
                tok = int(sample_next(logits, None, temperature=p.temperature, top_p=p.top_p, top_k=0,
                                      repetition_penalty=1.0, generator=r.generator)[0])
            except (RuntimeError, ValueError) as e:
                log.warning("request %d: sampling failed: %s", r.id, e)
                self._finish(r, "error", "sampling failed (the model's scores were not finite)")
                return
        r.generated += 1
        r.tokens.append(tok)
        self.tokens_generated += 1
        if tok in p.stop_token_ids and not p.ignore_eos:
            self._finish(r, "done", "stop")
            return
        try:
            r.on_event("token", tok)
        except Exception:  # a failing callback ends its own request only
            log.exception("request %d: event callback failed", r.id)
            self._finish(r, "error", "internal error while sending the answer")
            return
        if r.generated >= p.max_tokens or r.prompt_len + r.generated >= self.max_len:
            self._finish(r, "done", "length")
        else:
            r.pending = tok

    def _finish(self, r: Request, kind: str, value: str) -> None:
        if self.prefix is not None and kind == "done" and value != "cancelled" and r.slot is not None and r.tokens:
            self._keep_prefix(r)
        if r.slot is not None and self.slots[r.slot] is r:
            self.slots[r.slot] = None
        r.slot, r.pending, r.embeds = None, None, None
        try:
            r.on_event(kind, value)
        except Exception:  # a failing callback must not stop the engine
            log.exception("request %d: event callback failed", r.id)
