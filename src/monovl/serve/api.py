"""OpenAI-compatible HTTP API over an `Engine`: /v1/chat/completions (streaming or not), /v1/models,
/health and Prometheus /metrics. Every bad request gets a 4xx with an OpenAI-style error body."""
from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from monovl.images import ImageError, load_pixel_values
from monovl.serve.engine import Engine, QueueFull, Request, SamplingParams
from monovl.template import IMAGE_PLACEHOLDER, add_image_placeholders, expand_images, render
from monovl.tokenizer import StreamDecoder, Tokenizer

log = logging.getLogger(__name__)


# -- request schema --------------------------------------------------------------------------------------
class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # extension (as vLLM): always generate max_tokens


@dataclass
class ServeConfig:
    model_name: str
    api_key: str | None = None
    max_tokens_default: int = 256
    max_images: int = 8  # per request
    max_tiles: int | None = None  # tiles per image (None: the checkpoint's max_dynamic_patch)
    max_total_tiles: int = 32  # per request, all images
    max_pixels: int = 32_000_000  # per decoded image (decompression bombs)
    allowed_media_dir: Path | None = None  # local image paths are read only below this folder
    request_timeout: float = 300.0
    max_body_bytes: int = 64 * 2**20  # a larger request body is refused (413) before it is read


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers


def _error(status: int, message: str, code=None, param=None, headers=None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# -- metrics ---------------------------------------------------------------------------------------------
class Metrics:
    def __init__(self, engine: Engine):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("monovl_requests", "chat completion requests", ["status"], registry=r)
        self.errors = Counter("monovl_request_errors", "requests answered with an error", ["code"], registry=r)
        self.tokens = Counter("monovl_generated_tokens", "completion tokens sent", registry=r)
        self.ttft = Histogram("monovl_time_to_first_token_seconds", "time to first token", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.tpot = Histogram("monovl_time_per_output_token_seconds", "latency between tokens", registry=r,
                              buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))
        Gauge("monovl_queue_depth", "requests waiting for a slot", registry=r).set_function(
            lambda: engine.queue_depth)
        Gauge("monovl_active_requests", "requests holding a KV-cache slot", registry=r).set_function(
            lambda: engine.active)
        Gauge("monovl_tokens_per_second", "generated tokens/s over the last 5 s", registry=r).set_function(
            engine.tokens_per_second)


# -- prompt building -------------------------------------------------------------------------------------
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
    nit = mcfg.num_image_token if mcfg.vision is not None else 0
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
                pv = load_pixel_values(_image_bytes(url, cfg), image_size=mcfg.vision.image_size,
                                       min_num=mcfg.min_dynamic_patch,
                                       max_num=cfg.max_tiles or mcfg.max_dynamic_patch,
                                       use_thumbnail=mcfg.use_thumbnail, dynamic=mcfg.dynamic_image_size,
                                       max_pixels=cfg.max_pixels)
            except ImageError as e:
                raise APIError(400, f"image {n_images - len(images) + len(tiles) + 1}: {e}", "invalid_image") from None
            tiles.append(len(pv))
            pixels.append(pv)
        if sum(len(p) for p in pixels) > cfg.max_total_tiles:
            raise APIError(400, f"too many image tiles: at most {cfg.max_total_tiles} per request", "too_many_tiles")
        text = "".join(texts)
        if m.role == "user":
            try:
                text = expand_images(add_image_placeholders(text, len(tiles)), tiles, nit)
            except ValueError as e:
                raise APIError(400, str(e), param="messages") from None
        elif IMAGE_PLACEHOLDER in text:
            raise APIError(400, f"{IMAGE_PLACEHOLDER} may only appear in user messages", param="messages")
        messages.append({"role": m.role, "content": text})
    if messages[-1]["role"] != "user":
        raise APIError(400, "the last message must be the user's", param="messages")
    ids = tokenizer.encode(render(messages))
    if mcfg.image_token_id is not None and ids.count(mcfg.image_token_id) != nit * sum(len(p) for p in pixels):
        raise APIError(400, "the messages contain image tokens that do not belong to an image", param="messages")
    return torch.tensor(ids, dtype=torch.long), (torch.cat(pixels) if pixels else None)


class _StopMatcher:
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


# -- the app ---------------------------------------------------------------------------------------------
def create_app(engine: Engine, tokenizer: Tokenizer, cfg: ServeConfig) -> FastAPI:
    app = FastAPI(title="monovl", docs_url=None, redoc_url=None)
    metrics = Metrics(engine)
    app.state.engine, app.state.metrics, app.state.config = engine, metrics, cfg
    model = engine.model
    dispatcher = _Dispatcher()

    app.add_middleware(_BodyLimit, limit=cfg.max_body_bytes, errors=metrics.errors)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        metrics.errors.labels(str(e.status)).inc()
        return _error(e.status, e.message, e.code, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        metrics.errors.labels("400").inc()
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return _error(400, f"invalid request: {where + ': ' if where else ''}{first.get('msg', 'malformed body')}",
                      "invalid_request", where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail))

    def check_auth(request: HTTPRequest) -> None:
        if cfg.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {cfg.api_key}".encode()):
            raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer KEY')", "invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "active": engine.active, "queued": engine.queue_depth}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        check_auth(request)
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": 0,
                                             "owned_by": "monovl"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest, body: ChatRequest):
        check_auth(request)
        if body.model != cfg.model_name:
            raise APIError(404, f"model {body.model!r} not found; this server serves {cfg.model_name!r}",
                           "model_not_found", "model")
        if body.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4:
            raise APIError(400, "at most 4 stop sequences", param="stop")
        ids, pixels = await run_in_threadpool(build_prompt, body, model, tokenizer, cfg)
        if len(ids) >= engine.max_len:
            raise APIError(400, f"the prompt has {len(ids)} tokens but the context is {engine.max_len}",
                           "context_length_exceeded", "messages")
        max_tokens = min(body.max_completion_tokens or body.max_tokens or cfg.max_tokens_default,
                         engine.max_len - len(ids))
        params = SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                seed=body.seed, stop_token_ids=tuple(tokenizer.stop_token_ids),
                                ignore_eos=body.ignore_eos)
        events, dispatcher.loop = asyncio.Queue(), asyncio.get_running_loop()  # the server's one loop
        req = Request(ids, pixels, params, dispatcher.sink(events), deadline=time.monotonic() + cfg.request_timeout)
        try:
            engine.submit(req)
        except QueueFull as e:
            metrics.requests.labels("rejected").inc()
            raise APIError(429, f"server busy: {e}", "queue_full", headers={"Retry-After": "1"}) from None
        run = _Run(req, events, engine, tokenizer, stops, metrics, time.monotonic())
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(run, rid, created, cfg.model_name, include_usage),
                                     media_type="text/event-stream")
        watcher = asyncio.create_task(_cancel_on_disconnect(request, run))
        try:
            text = "".join([piece async for piece in run.pieces()])
        finally:
            watcher.cancel()
            engine.cancel(req)
        if run.error is not None:
            raise APIError(504 if "timed out" in run.error else 500, run.error, "generation_failed")
        return {"id": rid, "object": "chat.completion", "created": created, "model": cfg.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": run.finish_reason, "logprobs": None}],
                "usage": run.usage()}

    return app


class _BodyLimit:
    """Refuses (413) a request whose declared body is larger than `limit`, before reading it. A plain ASGI
    middleware: Starlette's BaseHTTPMiddleware would hide client disconnects from the endpoints."""

    def __init__(self, app, limit: int, errors):
        self.app, self.limit, self.errors = app, limit, errors

    async def __call__(self, scope, receive, send):
        size = dict(scope.get("headers", ())).get(b"content-length", b"0").decode("latin-1")
        if scope["type"] == "http" and (not size.isdigit() or int(size) > self.limit):
            self.errors.labels("413").inc()
            response = _error(413, f"request body of {size} bytes exceeds the limit of {self.limit} bytes",
                              "request_too_large")
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


class _Dispatcher:
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


class _Run:
    """The caller's side of one engine request: tokens → text pieces, stop strings, metrics."""

    def __init__(self, req, events, engine, tokenizer, stops, metrics, start):
        self.req, self.events, self.engine, self.metrics, self.start = req, events, engine, metrics, start
        self.decoder, self.stops = StreamDecoder(tokenizer), _StopMatcher(stops)
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


async def _cancel_on_disconnect(request: HTTPRequest, run: _Run, every: float = 0.1) -> None:
    """A non-streaming request whose client went away stops generating and frees its KV-cache slot."""
    while not await request.is_disconnected():
        await asyncio.sleep(every)
    run.engine.cancel(run.req)


async def _sse(run: _Run, rid: str, created: int, model: str, include_usage: bool):
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
