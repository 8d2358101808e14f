"""The caller's side of an engine request: engine-thread events to asyncio, tokens to text pieces cut at stop
strings, server-sent events, and cancellation when the client goes away."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque

from fastapi import Request as HTTPRequest

from monovl.tokenizer import StreamDecoder


class StopMatcher:
    """Cut streamed text at the first stop string, holding back text that may be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops, self.held = [s for s in stops if s], ""

    def feed(self, piece: str) -> tuple[str, bool]:
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return text[: min(hits)], True
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


class Dispatcher:
    """Moves engine events (engine thread) to the requests' asyncio queues with at most one event-loop wake-up
    per batch of events, instead of one per token: a decode step of B requests wakes the loop once."""

    def __init__(self):
        self.loop: asyncio.AbstractEventLoop | None = None
        self._events: deque = deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def sink(self, queue: asyncio.Queue):
        def on_event(kind, value):
            with self._lock:
                self._events.append((queue, (kind, value)))
                wake, self._scheduled = not self._scheduled, True
            if wake:
                self.loop.call_soon_threadsafe(self._drain)
        return on_event

    def _drain(self) -> None:
        with self._lock:
            events, self._events, self._scheduled = self._events, deque(), False
        for queue, event in events:
            queue.put_nowait(event)


class Run:
    """The caller's side of one engine request: tokens → text pieces, stop strings, metrics."""

    def __init__(self, req, events, engine, tokenizer, stops, metrics, start):
        self.req, self.events, self.engine, self.metrics, self.start = req, events, engine, metrics, start
        self.decoder, self.stops = StreamDecoder(tokenizer), StopMatcher(stops)
        self.completion_tokens, self.finish_reason, self.error = 0, None, None

    async def pieces(self):
        last = None
        while True:
            batch = [await self.events.get()]
            while not self.events.empty():  # send every token already generated in one piece
                batch.append(self.events.get_nowait())
            text, end = "", None
            for kind, value in batch:
                if kind == "token":
                    now = time.monotonic()
                    if last is None:
                        self.metrics.ttft.observe(now - self.start)
                    else:
                        self.metrics.tpot.observe(now - last)
                    last = now
                    self.completion_tokens += 1
                    self.metrics.tokens.inc()
                    text += self.decoder.put(value)
                else:
                    end = (kind, value)
                    break
            if end is not None:
                text += self.decoder.flush()
            out, stopped = self.stops.feed(text)
            if stopped:
                self.engine.cancel(self.req)
                self.finish_reason = "stop"
            elif end is not None:
                out += self.stops.flush()
                if end[0] == "error":
                    self.error = end[1]
                else:
                    self.finish_reason = "stop" if end[1] == "cancelled" else end[1]
            if out:
                yield out
            if stopped or end is not None:
                self.metrics.requests.labels("error" if self.error else "ok").inc()
                return

    def usage(self) -> dict:
        n = len(self.req.input_ids)
        return {"prompt_tokens": n, "completion_tokens": self.completion_tokens,
                "total_tokens": n + self.completion_tokens}


async def cancel_on_disconnect(request: HTTPRequest, run: Run, every: float = 0.1) -> None:
    """A non-streaming request whose client went away stops generating and frees its KV-cache slot."""
    while not await request.is_disconnected():
        await asyncio.sleep(every)
    run.engine.cancel(run.req)


async def sse(run: Run, rid: str, created: int, model: str, include_usage: bool):
    def chunk(delta: dict, finish=None, **extra) -> str:
        obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for piece in run.pieces():
            yield chunk({"content": piece})
        if run.error is not None:
            err = {"error": {"message": run.error, "type": "server_error", "param": None, "code": "generation_failed"}}
            yield f"data: {json.dumps(err)}\n\n"
        else:
            yield chunk({}, run.finish_reason)
            if include_usage:
                obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [], "usage": run.usage()}
                yield f"data: {json.dumps(obj)}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # also on a client disconnect (the generator is cancelled/closed): free the KV-cache slot
        run.engine.cancel(run.req)
