"""The OpenAI-compatible server, live on 127.0.0.1: happy paths with the real `openai` client, every bad
request answered with a 4xx (the server keeps serving), disconnects, backpressure, auth, metrics, loadtest."""
import socket
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn

import monovl
from monovl.loadtest import run_loadtest
from pictures import data_url, png
from random_checkpoint import write_random_checkpoint
from monovl.serve.api import ServeConfig, create_app
from monovl.serve.engine import Engine
from monovl.serve.http import protocol_with_header_timeout


class Server:
    def __init__(self, model, tokenizer, engine_kw, header_timeout=10.0, **cfg_kw):
        self.engine = Engine(model, **engine_kw).start()
        self.config = ServeConfig(model_name="tiny", **cfg_kw)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        app = create_app(self.engine, tokenizer, self.config)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    http=protocol_with_header_timeout(header_timeout)))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.engine.shutdown()


@pytest.fixture(scope="module")
def loaded(random_loaded):
    return random_loaded


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    (root / "red.png").write_bytes(png())
    return root


@pytest.fixture(scope="module")
def server(loaded, media):
    s = Server(*loaded, dict(max_batch=4, max_len=1024), max_pixels=1_000_000, max_images=3, max_tiles=2, max_total_tiles=8,
               max_body_bytes=4 * 2**20, allowed_media_dir=media)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _post(server, body, **kw):
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30, **kw)


def _user(content, **extra):
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


def test_models_health_and_chat_with_images(server, client, loaded):
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    parts = [{"type": "text", "text": "Compare these."},
             {"type": "image_url", "image_url": {"url": data_url(png())}},
             {"type": "image_url", "image_url": {"url": "red.png"}}]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": parts}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens <= 6 and r.usage.prompt_tokens > 20
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_greedy_answer_equals_generate_alone_under_concurrency(server, client, loaded):
    model, tok = loaded
    from monovl.template import render
    prompts = [f"Question {i}: what colour is the star?" for i in range(4)]
    want = []
    for p in prompts:
        ids = torch.tensor(tok.encode(render([{"role": "user", "content": p}])))
        out = monovl.generate(model, [ids], max_new_tokens=8, stop_token_ids=tok.stop_token_ids)[0].tolist()
        out = [t for t in out if t not in tok.stop_token_ids]
        want.append(tok.decode(out))
    got = [None] * len(prompts)

    def ask(i):
        got[i] = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompts[i]}],
                                                max_tokens=8, temperature=0).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert got == want


def test_streaming_with_openai_client(server, client):
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Count."}],
                                            max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Count."}],
                                           max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10
    raw = httpx.post(server.url + "/v1/chat/completions", json=_user("x", stream=True), timeout=30).text
    assert raw.rstrip().endswith("data: [DONE]")


def test_sampling_seed_and_stop(server, client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Say something."}], max_tokens=12,
              temperature=1.0, top_p=0.9, seed=7, extra_body={"ignore_eos": True})
    a = client.chat.completions.create(**kw).choices[0].message.content
    assert a == client.chat.completions.create(**kw).choices[0].message.content
    assert len(a) >= 2
    stop = a[1:3]
    r = client.chat.completions.create(**kw, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and stop not in r.choices[0].message.content
    assert a.startswith(r.choices[0].message.content)


BAD = {
    "malformed_json": (b'{"model": "tiny", "messages": [', 400, "invalid"),
    "wrong_types": ({"model": "tiny", "messages": "hello"}, 400, "messages"),
    "bad_temperature": (_user("hi", temperature="hot"), 400, "temperature"),
    "unknown_model": ({**_user("hi"), "model": "gpt-9"}, 404, "not found"),
    "empty_messages": ({"model": "tiny", "messages": []}, 400, "messages"),
    "last_not_user": ({"model": "tiny", "messages": [{"role": "assistant", "content": "x"}]}, 400, "last message"),
    "invalid_base64": (_user([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]), 400,
                       "base64"),
    "not_an_image": (_user([{"type": "image_url", "image_url": {"url": data_url(b"hello world")}}]), 400,
                     "not an image"),
    "truncated_image": (_user([{"type": "image_url", "image_url": {"url": data_url(png((300, 300))[:200])}}]),
                        400, "image"),
    "decompression_bomb": (_user([{"type": "image_url", "image_url": {"url": data_url(png((2000, 2000), 0, "L"))}}]),
                           400, "decompression bomb"),
    "too_many_images": (_user([{"type": "image_url", "image_url": {"url": data_url(png())}}] * 4), 400,
                        "too many images"),
    "too_many_tiles": (_user([{"type": "image_url", "image_url": {"url": data_url(png((600, 100)))}}] * 3), 400,
                       "too many image tiles"),
    "remote_url": (_user([{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]), 400,
                   "remote image"),
    "path_escape": (_user([{"type": "image_url", "image_url": {"url": "../../etc/passwd"}}]), 400, "outside"),
    "prompt_too_long": (_user("one two three " * 600), 400, "context"),
    "lone_surrogate": (b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}]}', 400, "surrogate"),
    "lone_surrogate_in_stop": (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": ["\\udfff"]}',
                               400, "surrogate"),
    "seed_2_63": (_user("hi", seed=2**63), 400, "seed"),
    "seed_huge": (_user("hi", seed=10**30), 400, "seed"),
    "n_2": (_user("hi", n=2), 400, "n=1"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_requests_get_4xx_and_server_keeps_serving(server, case):
    body, status, words = BAD[case]
    if isinstance(body, bytes):
        r = httpx.post(server.url + "/v1/chat/completions", content=body, timeout=30,
                       headers={"content-type": "application/json"})
    else:
        r = _post(server, body)
    assert r.status_code == status, r.text
    assert words.lower() in r.json()["error"]["message"].lower()
    assert _post(server, _user("still there?")).status_code == 200


def _assert_slot_freed_early(server, before: int) -> None:
    """The abandoned request's slot is freed well before its 900 tokens, and the server still answers."""
    deadline = time.monotonic() + 10
    while server.engine.active and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.engine.active == 0
    assert server.engine.tokens_generated - before < 800  # stopped early, not run to the end
    assert _post(server, _user("next")).status_code == 200


def test_client_disconnect_mid_stream_frees_the_slot(server):
    body = _user("Tell me a long story.", max_tokens=900, stream=True, ignore_eos=True)
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
    before = server.engine.tokens_generated
    _assert_slot_freed_early(server, before)


def test_client_disconnect_while_waiting_for_a_full_answer_frees_the_slot(server):
    body = _user("Tell me a long story.", max_tokens=900, ignore_eos=True)
    before = server.engine.tokens_generated
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=0.3)
    _assert_slot_freed_early(server, before)


def test_oversized_body_is_refused_before_it_is_read(server):
    limit = server.config.max_body_bytes
    r = httpx.post(server.url + "/v1/chat/completions", content=b"x" * (limit + 1), timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]["message"]
    assert _post(server, _user("next")).status_code == 200


def test_metrics(server):
    text = httpx.get(server.url + "/metrics").text
    for name in ("monovl_requests_total", "monovl_request_errors_total", "monovl_queue_depth",
                 "monovl_time_to_first_token_seconds_bucket", "monovl_time_per_output_token_seconds_bucket",
                 "monovl_tokens_per_second"):
        assert name in text


def test_auth_backpressure_and_timeout(loaded):
    s = Server(*loaded, dict(max_batch=1, max_len=2048, max_queue=1), api_key="sekret", request_timeout=0.5)
    try:
        auth = {"Authorization": "Bearer sekret"}
        assert _post(s, _user("hi")).status_code == 401
        assert httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert _post(s, _user("hi"), headers=auth).status_code == 200
        long = _user("go", max_tokens=2000, ignore_eos=True)
        results = {}

        def send(name):
            results[name] = _post(s, long, headers=auth)

        first = threading.Thread(target=send, args=("first",))
        first.start()
        while not s.engine.active:
            time.sleep(0.005)
        second = threading.Thread(target=send, args=("second",))
        second.start()
        while not s.engine.queue_depth:
            time.sleep(0.005)
        busy = _post(s, _user("hi"), headers=auth)
        assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
        first.join(), second.join()
        assert results["first"].status_code == 504 and "timed out" in results["first"].json()["error"]["message"]
        assert results["second"].status_code in (200, 504)
        assert _post(s, _user("hi"), headers=auth).status_code == 200
    finally:
        s.stop()


def test_loadtest_against_live_server(server):
    report = run_loadtest(server.url + "/v1", clients=3, requests=6, max_tokens=5)
    assert report["failed"] == 0 and report["requests"] == 6 and report["tokens"] == 30
    assert report["tokens_per_s"] > 0 and report["ttft_p50"] > 0
    with pytest.raises(ValueError, match="local"):
        run_loadtest("http://example.com/v1", clients=1, requests=1)


def test_cli_serve_and_loadtest(server, loaded, tmp_path, monkeypatch, capsys):
    from monovl.cli import main

    ran = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: ran.update(app=app, host=host, port=port, **kw))
    ckpt = write_random_checkpoint(tmp_path / "ck")
    assert main(["serve", "--model", str(ckpt), "--port", "9", "--max-batch", "2", "--max-len", "128"]) == 0
    assert ran["host"] == "127.0.0.1" and ran["port"] == 9 and ran["app"].state.config.model_name == "ck"
    assert ran["app"].state.engine.cache.k.shape[1:4:2] == (2, 128)
    assert main(["loadtest", "--url", server.url + "/v1", "--clients", "2", "--requests", "2",
                 "--max-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "TTFT p50" in out and "aggregate" in out and "(0 failed)" in out
