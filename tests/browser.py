"""Headless Chromium (the system's package, driven by Selenium through the system's chromedriver) for the chat
page tests. Without Chromium the tests fail, they do not skip: `.ci/run` installs it (Debian: chromium,
chromium-driver)."""
import base64
import shutil
import time

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

PHONE = {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True}


def chromium(width: int = 1000, height: int = 760) -> webdriver.Chrome:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.fail("the chat page tests need Chromium and its driver on PATH (Debian: apt-get install chromium "
                    "chromium-driver; .ci/run installs them)", pytrace=False)
    options = Options()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--lang=en-US"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


def wait_for(condition, timeout: float = 30.0, what: str = "the page"):
    """condition()'s first truthy value, polled; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


class Page:
    """The chat page in a browser, by the element ids of `monovl/serve/static/index.html`."""

    def __init__(self, driver: webdriver.Chrome, url: str):
        self.driver = driver
        driver.get(url)

    def el(self, element_id: str):
        return self.driver.find_element(By.ID, element_id)

    def all(self, css: str):
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def text(self, element) -> str:
        return self.driver.execute_script("return arguments[0].textContent", element)

    def wait_connected(self, model: str) -> None:
        wait_for(lambda: self.el("model").text == model, 30, f"the model name {model!r}")

    def setting(self, element_id: str, value) -> None:
        self.driver.execute_script("arguments[0].value = arguments[1]", self.el(element_id), str(value))

    def ask(self, question: str) -> None:
        self.el("input").send_keys(question)
        self.el("send").click()

    def wait_answered(self, timeout: float = 60.0) -> str:
        """The last answer's text, once its stream has ended (the Send button is back)."""
        wait_for(lambda: self.el("send").is_displayed() and not self.all(".pending-answer"), timeout, "the answer")
        return self.text(self.all(".msg.assistant .text")[-1])

    def error(self) -> str:
        return self.el("error-text").text if self.el("error").is_displayed() else ""

    def attach(self, path) -> None:
        """Through the image picker (the file input)."""
        self.el("file").send_keys(str(path))

    def transfer(self, event: str, name: str, data: bytes, mime: str = "image/png") -> None:
        """A file dropped on the page (event "drop") or pasted into it ("paste"), as a browser's DataTransfer."""
        self.driver.execute_script("""
            const [event, name, b64, mime] = arguments;
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, {type: mime}));
            const target = event === "paste" ? document.getElementById("input") : document.getElementById("log");
            const e = event === "paste"
                ? new ClipboardEvent("paste", {clipboardData: transfer, bubbles: true, cancelable: true})
                : new DragEvent(event, {dataTransfer: transfer, bubbles: true, cancelable: true});
            target.dispatchEvent(e);
        """, event, name, base64.b64encode(data).decode(), mime)

    def shot(self, path) -> None:
        self.driver.save_screenshot(str(path))
