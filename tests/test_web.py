"""The chat page's files as the server sends them, their place in the package data, and `monovl web`; the page
itself runs in a real browser in test_web_browser.py (slow tier)."""
import fnmatch
import re
import threading
import tomllib
import webbrowser
from pathlib import Path

import pytest
import uvicorn
from fastapi.testclient import TestClient

from monovl.cli import build_parser, main
from monovl.serve.api import ServeConfig, create_app
from monovl.serve.engine import Engine
from monovl.serve.page import STATIC
from random_checkpoint import write_random_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def app_with_key(random_loaded):
    model, tokenizer = random_loaded
    return create_app(Engine(model, max_batch=1, max_len=64), tokenizer, ServeConfig("tiny", api_key="sekret"))


def test_the_page_and_its_files_are_served_without_the_api_key(app_with_key):
    client = TestClient(app_with_key)
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sorted(assets) == ["static/app.js", "static/style.css"]
    for asset, kind in zip(sorted(assets), ("javascript", "text/css")):
        r = client.get("/" + asset)
        assert r.status_code == 200 and kind in r.headers["content-type"] and len(r.text) > 1000
    assert client.get("/v1/models").status_code == 401  # the API itself still wants the key
    assert client.get("/static/../api.py").status_code == 404 and client.get("/static/nothing.js").status_code == 404


def test_the_page_needs_nothing_from_the_network():
    for path in STATIC.iterdir():
        text = path.read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I), path.name  # no CDN, no fonts
        assert "innerHTML" not in text and "eval(" not in text, path.name  # model text only as textContent


def test_the_page_talks_to_the_openai_endpoint_with_streaming():
    js = (STATIC / "app.js").read_text()
    for needle in ('fetch("v1/chat/completions"', 'fetch("v1/models"', "stream: true", "AbortController",
                   '"image_url"', "readAsDataURL", "Authorization", '"paste"', '"drop"'):
        assert needle in js, needle


def test_the_static_files_are_package_data():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = project["tool"]["setuptools"]["package-data"]["monovl"]
    package = ROOT / "src" / "monovl"
    files = sorted(str(p.relative_to(package)) for p in STATIC.iterdir())
    assert files and all(any(fnmatch.fnmatch(f, g) for g in globs) for f in files), files


@pytest.fixture
def fake_run(monkeypatch):
    """uvicorn.Server.run that records what it was given, says it started, and waits up to ran["wait"] seconds for
    a browser to be opened."""
    ran, opened = {"wait": 5.0}, threading.Event()

    def run(self, sockets=None):
        ran.update(app=self.config.app, port=sockets[0].getsockname()[1], host=sockets[0].getsockname()[0])
        self.started = True
        opened.wait(ran["wait"])

    monkeypatch.setattr(uvicorn.Server, "run", run)
    monkeypatch.setattr(webbrowser, "open", lambda url: ran.update(opened=url) or opened.set())
    return ran


def test_monovl_web_serves_on_a_free_local_port_and_opens_the_browser(fake_run, tmp_path):
    ckpt = write_random_checkpoint(tmp_path / "ck")
    assert main(["web", "--model", str(ckpt), "--max-len", "64", "--max-batch", "1"]) == 0
    assert fake_run["host"] == "127.0.0.1" and fake_run["port"] > 0
    assert fake_run["opened"] == f"http://127.0.0.1:{fake_run['port']}/"
    assert fake_run["app"].state.config.model_name == "ck" and fake_run["app"].state.engine._stop


def test_monovl_web_defaults_to_the_shipped_model(fake_run, capsys):
    assert build_parser("web").parse_args(["web"]).model is None
    fake_run["wait"] = 0.3  # time enough for a browser to be opened by mistake
    assert main(["web", "--no-browser", "--max-len", "64", "--max-batch", "1", "--api-key", "k"]) == 0
    assert "opened" not in fake_run
    assert fake_run["app"].state.config.model_name == "tiny" and fake_run["app"].state.config.api_key == "k"
    assert f"http://127.0.0.1:{fake_run['port']}/" in capsys.readouterr().err


def test_monovl_web_reports_a_busy_port(tmp_path, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["web", "--no-browser", "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
