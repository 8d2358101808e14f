"""The chat page in a real headless Chromium against a live server: a text question, images from the picker, a
drop and a paste, a stopped answer (and the server cancelling its generation), a refused image, a full queue,
the API key, "New chat" and a phone-sized screen. Screenshots go to each test's temporary folder."""
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from browser import PHONE, Page, chromium, wait_for
from pictures import png
from test_serve import Server

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(random_loaded):
    """One slot and one queue place, so that a second waiting request fills the queue; one tile per image."""
    s = Server(*random_loaded, dict(max_batch=1, max_queue=1, max_len=2048), max_tiles=1, max_images=4)
    s.submitted, s.tokenizer = [], random_loaded[1]
    submit = s.engine.submit
    s.engine.submit = lambda req: s.submitted.append(req) or submit(req)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def driver():
    d = chromium()
    yield d
    d.quit()


@pytest.fixture
def page(driver, server):
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    p = Page(driver, server.url + "/")
    p.wait_connected("tiny")
    p.setting("max-tokens", 4)  # short answers unless a test needs a long one: the random model never stops early
    return p


def _greedy_answer(server, messages, max_tokens) -> str:
    body = {"model": "tiny", "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"][
        "content"]


def test_a_text_question_is_answered_as_the_api_answers_it(page, server, tmp_path):
    page.setting("max-tokens", 12)
    page.ask("How many shapes are there?")
    answer = page.wait_answered()
    assert [page.text(m) for m in page.all(".msg.user .text")] == ["How many shapes are there?"]
    assert answer and answer == _greedy_answer(server, [{"role": "user", "content": "How many shapes are there?"}], 12)
    assert server.submitted[-1].params.max_tokens == 12 and server.submitted[-1].params.temperature == 0
    page.shot(tmp_path / "text.png")


def test_images_from_the_picker_a_drop_and_a_paste(page, server, tmp_path):
    red, blue, green = tmp_path / "red.png", png(color=(20, 40, 220)), png(size=(4000, 1000), color=(20, 200, 40))
    red.write_bytes(png())
    page.attach(red)
    wait_for(lambda: len(page.all("#pending .thumb")) == 1, 10, "the picked image's thumbnail")
    page.ask("What colour is it?")
    page.wait_answered()
    assert page.all(".msg.user .thumb")[0].get_attribute("src").startswith("data:image/png;base64,")
    assert server.submitted[-1].pixel_values.shape[0] == 1  # one image, one tile
    page.transfer("drop", "blue.png", blue)
    page.transfer("paste", "green.png", green)
    wait_for(lambda: len(page.all("#pending .thumb")) == 2, 10, "the dropped and pasted images' thumbnails")
    sizes = [page.driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", t)
             for t in page.all("#pending .thumb")]
    assert sizes == [[60, 40], [2048, 512]]  # a large image is scaled down before it is sent
    page.ask("And these two?")
    assert not page.all("#pending .thumb")  # sent with the message
    page.wait_answered()
    assert page.error() == ""
    assert len(page.all(".msg.user .thumb")) == 3 and len(page.all(".msg.assistant")) == 2
    assert server.submitted[-1].pixel_values.shape[0] == 3  # the whole conversation's images went along
    page.shot(tmp_path / "images.png")


def test_a_refused_image_shows_the_servers_message_and_the_chat_goes_on(page, server, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"these bytes are not a PNG")
    body = {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,dGhlc2UgYnl0ZXMgYXJlIG5vdCBhIFBORw=="}}]}]}
    expected = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert expected.status_code == 400
    page.attach(broken)
    page.ask("What is this?")
    wait_for(page.error, 30, "the error message")
    assert page.error() == expected.json()["error"]["message"] and "image 1" in page.error()
    assert "not sent" in page.all(".msg.user")[0].text and not page.all(".msg.assistant")
    page.shot(tmp_path / "refused.png")
    n = len(server.submitted)
    page.ask("Hello?")  # the refused turn is not part of the conversation any more
    page.wait_answered()
    assert page.error() == "" and len(server.submitted) == n + 1 and server.submitted[-1].pixel_values is None


def test_stop_cancels_the_generation(page, server, tmp_path):
    page.setting("max-tokens", 1500)
    before = server.engine.tokens_generated
    page.ask("Tell me a long story.")
    wait_for(lambda: page.text(page.all(".msg.assistant .text")[-1]), 30, "the first words of the answer")
    assert page.el("stop").is_displayed()  # the answer shows while it is being written: it streams
    page.el("stop").click()
    wait_for(lambda: page.el("send").is_displayed(), 10, "the Send button after Stop")
    assert "stopped" in page.all(".msg.assistant")[-1].text and page.error() == ""
    wait_for(lambda: server.engine.active == 0, 10, "the slot to be freed")
    assert server.engine.tokens_generated - before < 1000  # the server cancelled it, not run to 1500 tokens
    page.shot(tmp_path / "stopped.png")
    page.setting("max-tokens", 3)
    page.ask("Go on.")  # the stopped answer stays in the conversation
    page.wait_answered()
    assert "Tell me a long story." in _prompt_text(server) and len(page.all(".msg.assistant")) == 2


def _prompt_text(server) -> str:
    return server.tokenizer.decode(server.submitted[-1].input_ids.tolist())


def test_a_full_queue_is_reported(page, server, tmp_path):
    def body(tokens):
        return {"model": "tiny", "messages": [{"role": "user", "content": "wait"}], "stream": True,
                "max_tokens": tokens, "ignore_eos": True}

    url = server.url + "/v1/chat/completions"
    with httpx.stream("POST", url, json=body(2000), timeout=60), httpx.stream("POST", url, json=body(5), timeout=60):
        wait_for(lambda: server.engine.active == 1 and server.engine.queue_depth == 1, 10, "a full queue")
        page.ask("Am I next?")
        wait_for(page.error, 30, "the busy message")
        assert "queue is full" in page.error() and "max_queue=1" in page.error()  # ours, then the server's message
        page.shot(tmp_path / "busy.png")
    wait_for(lambda: server.engine.active == 0 and server.engine.queue_depth == 0, 10, "the slot to be freed")


def test_new_chat_starts_an_empty_conversation(page, server):
    page.setting("max-tokens", 3)
    page.ask("First question")
    page.wait_answered()
    page.ask("Second question")
    page.wait_answered()
    two_turns = len(server.submitted[-1].input_ids)
    page.el("new-chat").click()
    assert page.all(".msg") == [] and page.el("empty").is_displayed()
    page.ask("Second question")
    page.wait_answered()
    assert len(server.submitted[-1].input_ids) < two_turns - 5
    assert [page.text(m) for m in page.all(".msg.user .text")] == ["Second question"]


def test_the_page_asks_for_the_api_key(driver, random_loaded, tmp_path):
    s = Server(*random_loaded, dict(max_batch=1, max_len=256), api_key="sekret")
    try:
        page = Page(driver, s.url + "/")
        wait_for(lambda: page.el("key-form").is_displayed(), 30, "the API key form")
        assert not page.el("send").is_enabled()
        page.el("api-key").send_keys("wrong\n")
        wait_for(lambda: "refused" in page.error(), 30, "the refused key message")
        page.el("api-key").clear()
        page.el("api-key").send_keys("sekret\n")
        page.wait_connected("tiny")
        assert not page.el("key-form").is_displayed()
        page.setting("max-tokens", 3)
        page.ask("hi")
        assert page.wait_answered() is not None and page.error() == ""
        page.shot(tmp_path / "key.png")
    finally:
        s.stop()


def test_a_phone_sized_screen(page, driver, tmp_path):
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", PHONE)
    try:
        page = Page(driver, page.driver.current_url)
        page.wait_connected("tiny")
        page.setting("max-tokens", 8)
        page.attach(_write(tmp_path / "red.png", png(size=(300, 200))))
        page.ask("What colour is the picture? Please answer in a short sentence that wraps on a narrow screen.")
        page.wait_answered()
        width = driver.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1] == PHONE["width"]  # nothing sticks out sideways
        picker = page.el("file").find_element("xpath", "..")  # the Image button (the input inside is hidden)
        for element in (page.el("input"), page.el("send"), picker, page.el("new-chat"), page.el("settings")):
            box = driver.execute_script("return arguments[0].getBoundingClientRect().toJSON()", element)
            assert 0 <= box["left"] and box["right"] <= PHONE["width"] and box["bottom"] <= PHONE["height"], box
        page.shot(tmp_path / "phone.png")
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_monovl_web_serves_the_shipped_model(driver, tmp_path):
    """The command as a person runs it: no --model, a free port, the address printed, no browser opened."""
    proc = subprocess.Popen([sys.executable, "-m", "monovl.cli", "web", "--no-browser", "--threads", "1",
                             "--no-access-log"],
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        lines = []
        while not (url := re.search(r"http://127\.0\.0\.1:\d+/", lines[-1] if lines else "")):
            lines.append(proc.stderr.readline())
            assert lines[-1] and len(lines) < 50, "".join(lines)  # its output ended without the page's address
        page = Page(driver, url.group(0))
        page.wait_connected("tiny")
        page.attach(ROOT / "examples" / "shapes.png")
        page.ask("What colour is the circle?")
        answer = page.wait_answered()
        assert re.search(r"[A-Za-z]{2}", answer), answer  # the tiny model answers in words
        page.shot(tmp_path / "shipped.png")
    finally:
        proc.terminate()
        proc.wait(30)
