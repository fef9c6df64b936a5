"""The page at `/` in real headless Chromium against a real uvicorn server: pick an image, see its prediction.

Chromium (Debian's /usr/bin/chromium) and the `playwright` package are test requirements: when either is
missing these tests FAIL with the fix, they never skip (CI installs both: `.ci/run`, the `test` extra).
"""
import io
import socket
import threading
from pathlib import Path

import pytest
import uvicorn
from conftest import random_image
from test_bundle import save_random_bundle

from effitune.serve import create_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail('the playwright package is missing: pip install -e ".[test]" (never `playwright install`: '
                    "the tests use Debian's chromium)")
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("page") / "model"
    save_random_bundle(folder, classes=("cat", "dog", "fox"))
    return folder


class Server:
    """uvicorn in a thread on 127.0.0.1, on a port the OS picked (bound before start: no race)."""

    def __init__(self, app):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}/"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        for _ in range(500):
            if self.server.started:
                return self
            self.thread.join(0.02)
        raise RuntimeError("uvicorn did not start within 10 s")

    def __exit__(self, *_):
        self.server.should_exit = True
        self.thread.join(10)
        self.socket.close()


def open_page(browser, url):
    page = browser.new_page()
    page.set_default_timeout(20_000)
    requests, console_errors = [], []
    page.on("request", lambda request: requests.append(request.url))
    page.on("console", lambda message: message.type == "error" and console_errors.append(message.text))
    page.goto(url)
    return page, requests, console_errors


def write_image(folder: Path, name: str, seed: int) -> Path:
    path = folder / name
    buffer = io.BytesIO()
    random_image(seed, (64, 48)).save(buffer, "PNG")
    path.write_bytes(buffer.getvalue())
    return path


def test_pick_an_image_and_see_its_prediction(browser, bundle, tmp_path):
    images = [write_image(tmp_path, "kitten.png", 1), write_image(tmp_path, "puppy.png", 2)]
    with Server(create_app(bundle)) as server:
        page, requests, console_errors = open_page(browser, server.url)
        page.wait_for_function("() => document.getElementById('model').textContent.includes('3 classes')")
        page.set_input_files("#files", [str(p) for p in images])
        page.wait_for_selector(".result .label")
        cards = page.locator(".result")
        assert cards.count() == 2
        names = {cards.nth(i).locator(".name").inner_text() for i in range(2)}
        assert names == {"kitten.png", "puppy.png"}
        first = cards.nth(0)
        assert first.locator(".top .label").inner_text() in ("cat", "dog", "fox")
        assert first.locator(".bars li").count() == 3
        widths = [first.locator(".fill").nth(i).evaluate("e => e.getBoundingClientRect().width") for i in range(3)]
        assert widths[0] > 0 and widths == sorted(widths, reverse=True)  # bars drawn, longest first
        assert "2 images in" in page.inner_text("#status")
        page.close()
    assert all(url.startswith((server.url, "blob:", "data:")) for url in requests), requests
    assert not console_errors, console_errors  # a Content-Security-Policy block would show here


def test_the_page_shows_where_the_model_looks(browser, bundle, tmp_path):
    picture = write_image(tmp_path, "kitten.png", 4)
    with Server(create_app(bundle)) as server:
        page, requests, console_errors = open_page(browser, server.url)
        page.wait_for_function("() => document.getElementById('model').textContent.includes('3 classes')")
        page.set_input_files("#files", str(picture))
        page.wait_for_selector(".result .label")
        page.click(".result .why")
        page.wait_for_selector(".result img.overlay")  # the heatmap over the picture, from POST /explain
        image = page.locator(".result img")
        assert image.get_attribute("src").startswith("data:image/png;base64,")
        assert image.evaluate("e => e.naturalWidth") > 0  # a PNG the browser could draw
        assert page.locator(".result .why").inner_text().startswith("Heat: where it sees ")
        page.close()
    assert any(url.endswith("/explain") for url in requests)
    assert not console_errors, console_errors


def test_the_page_shows_refusals_and_sends_the_api_key(browser, bundle, tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("shopping list, not a picture")
    picture = write_image(tmp_path, "photo.png", 3)
    with Server(create_app(bundle, api_key="s3cret")) as server:
        page, _, _ = open_page(browser, server.url)
        page.wait_for_selector("#key", state="visible")
        page.set_input_files("#files", str(picture))
        page.wait_for_selector("#status.error")
        assert page.inner_text("#status").startswith("401")
        page.fill("#key", "s3cret")
        page.set_input_files("#files", str(not_an_image))
        page.wait_for_function("() => document.getElementById('status').textContent.startsWith('415')")
        assert "notes.png" in page.inner_text("#status")
        page.set_input_files("#files", str(picture))
        page.wait_for_selector(".result .label")
        assert page.locator(".result .name").inner_text() == "photo.png"
        page.close()
