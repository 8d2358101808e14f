"""A bounded load generator for a local `monovl serve`: N concurrent streaming clients, M requests in all.

Reports time to first token (TTFT) p50/p95, per-token latency (gap between streamed chunks, divided by the
tokens they carry) and aggregate completion tokens/s over the whole run. Loopback servers only.
"""
from __future__ import annotations

import asyncio
import json
import statistics
import time
from urllib.parse import urlparse

import httpx

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
MAX_REQUESTS = 10_000
PROMPTS = ["Describe a red circle above a blue square.", "How many shapes are in the picture?",
           "What colour is the large star?", "Count from one to ten."]


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def _one(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    start = time.monotonic()
    ttft, last, tokens = None, None, 0
    async with client.stream("POST", f"{url}/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"ok": False, "status": r.status_code}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "usage" in obj and obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
            if any(c["delta"].get("content") for c in obj.get("choices", [])):
                now = time.monotonic()
                ttft = now - start if ttft is None else ttft
                last = now
    per_token = (last - start - ttft) / max(tokens - 1, 1) if ttft is not None and tokens > 1 else None
    return {"ok": True, "ttft": ttft, "per_token": per_token, "tokens": tokens}


async def _run(url, clients, requests, max_tokens, model, api_key, time_limit) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(time_limit)) as client:
        try:  # the server is there and answers, before any client starts
            r = await client.get(f"{url}/models")
            r.raise_for_status()
            model = model or r.json()["data"][0]["id"]
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
            raise ValueError(f"cannot list the models of the server at {url}: {e or type(e).__name__}") from None
        todo = iter(range(requests))
        results: list[dict] = []
        deadline = time.monotonic() + time_limit

        async def worker(k: int):
            for i in todo:
                if time.monotonic() > deadline:
                    return
                try:
                    results.append(await _one(client, url, model, PROMPTS[(i + k) % len(PROMPTS)], max_tokens))
                except httpx.HTTPError as e:
                    results.append({"ok": False, "status": type(e).__name__})

        start = time.monotonic()
        try:
            await asyncio.wait_for(asyncio.gather(*(worker(k) for k in range(clients))), time_limit)
        except TimeoutError:
            pass
        wall = time.monotonic() - start
    ok = [r for r in results if r["ok"]]
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    per_tok = [r["per_token"] for r in ok if r["per_token"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    return {"clients": clients, "requests": len(results), "failed": len(results) - len(ok), "wall_s": wall,
            "tokens": tokens, "tokens_per_s": tokens / wall if wall > 0 else 0.0,
            "ttft_p50": _pct(ttfts, 0.5), "ttft_p95": _pct(ttfts, 0.95),
            "per_token_p50": _pct(per_tok, 0.5), "per_token_mean": statistics.fmean(per_tok) if per_tok else 0.0}


def run_loadtest(url: str, *, clients: int = 8, requests: int = 32, max_tokens: int = 64, model: str | None = None,
                 api_key: str | None = None, time_limit: float = 300.0) -> dict:
    """Run the load test against `url` (e.g. http://127.0.0.1:8000/v1) and return its figures."""
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"loadtest only targets a local server (127.0.0.1/localhost), not {host!r}")
    if not 1 <= clients <= 256 or not 1 <= requests <= MAX_REQUESTS:
        raise ValueError(f"need 1 <= clients <= 256 and 1 <= requests <= {MAX_REQUESTS}")
    return asyncio.run(_run(url.rstrip("/"), clients, requests, max_tokens, model, api_key, time_limit))


def format_report(r: dict) -> str:
    return (f"clients {r['clients']}, requests {r['requests']} ({r['failed']} failed), {r['tokens']} tokens in "
            f"{r['wall_s']:.2f} s\n"
            f"TTFT p50 {r['ttft_p50'] * 1e3:.1f} ms, p95 {r['ttft_p95'] * 1e3:.1f} ms | per-token latency p50 "
            f"{r['per_token_p50'] * 1e3:.2f} ms, mean {r['per_token_mean'] * 1e3:.2f} ms\n"
            f"aggregate {r['tokens_per_s']:.1f} tokens/s")
