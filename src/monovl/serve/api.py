"""OpenAI-compatible HTTP API over an `Engine`: /v1/chat/completions (streaming or not), /v1/models,
/health, Prometheus /metrics and the browser chat page at / (`page`). Every bad request gets a 4xx with an
OpenAI-style error body."""
from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from monovl.serve.engine import Engine, QueueFull, Request, SamplingParams
from monovl.serve.http import Gate
from monovl.serve.page import add_chat_page
from monovl.serve.prompts import build_prompt
from monovl.serve.protocol import APIError, ChatRequest, ServeConfig, error_response
from monovl.serve.streaming import Dispatcher, Run, cancel_on_disconnect, sse
from monovl.tokenizer import Tokenizer

__all__ = ["Metrics", "ServeConfig", "create_app"]


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


def create_app(engine: Engine, tokenizer: Tokenizer, cfg: ServeConfig) -> FastAPI:
    app = FastAPI(title="monovl", docs_url=None, redoc_url=None)
    metrics = Metrics(engine)
    app.state.engine, app.state.metrics, app.state.config = engine, metrics, cfg
    app.add_middleware(Gate, limit=cfg.max_body_bytes, body_timeout=cfg.body_timeout, api_key=cfg.api_key,
                       errors=metrics.errors)
    _add_error_handlers(app, metrics)
    dispatcher = Dispatcher()
    add_chat_page(app)

    @app.get("/health")
    async def health():
        return {"status": "ok", "active": engine.active, "queued": engine.queue_depth}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():  # the API key of /v1/ paths is checked by the Gate, before the body is read
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": 0,
                                             "owned_by": "monovl"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest, body: ChatRequest):
        run = await _start_run(body, engine, tokenizer, cfg, metrics, dispatcher)
        request.state.run = run  # for the access log line
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(sse(run, rid, created, cfg.model_name, include_usage),
                                     media_type="text/event-stream")
        watcher = asyncio.create_task(cancel_on_disconnect(request, run))
        try:
            text = "".join([piece async for piece in run.pieces()])
        finally:
            watcher.cancel()
            engine.cancel(run.req)
        if run.error is not None:
            raise APIError(504 if "timed out" in run.error else 500, run.error, "generation_failed")
        return {"id": rid, "object": "chat.completion", "created": created, "model": cfg.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": run.finish_reason, "logprobs": None}],
                "usage": run.usage()}

    return app


def _add_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """OpenAI-style error bodies for our APIErrors, invalid request bodies and Starlette's HTTP errors."""

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        metrics.errors.labels(str(e.status)).inc()
        return error_response(e.status, e.message, e.code, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        metrics.errors.labels("400").inc()
        errors = e.errors()  # ours (value_error) first: in a union it would hide behind the other member's error
        first = next((x for x in errors if x.get("type") == "value_error"), errors[0] if errors else {})
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body" and "[" not in str(x))
        message = f"invalid request: {where + ': ' if where else ''}{first.get('msg', 'malformed body')}"
        return error_response(400, message, "invalid_request", where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail))


async def _start_run(body: ChatRequest, engine: Engine, tokenizer: Tokenizer, cfg: ServeConfig, metrics: Metrics,
                     dispatcher: Dispatcher) -> Run:
    """Check the request, build its prompt, submit it to the engine; raises APIError."""
    if body.model != cfg.model_name:
        raise APIError(404, f"model {body.model!r} not found; this server serves {cfg.model_name!r}",
                       "model_not_found", "model")
    if body.n != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4:
        raise APIError(400, "at most 4 stop sequences", param="stop")
    ids, pixels = await run_in_threadpool(build_prompt, body, engine.model, tokenizer, cfg)
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
    return Run(req, events, engine, tokenizer, stops, metrics, time.monotonic())
