"""The page of `sdtorch serve` in a real browser: Debian's chromium, driven by Playwright, against a
real server on 127.0.0.1. Type a prompt, generate, watch the preview change step by step before the
result appears; interrupt; drop a PNG to fill the form. Every request the page makes must stay on
the loopback address."""

from __future__ import annotations

import base64
import io
import os
import shutil
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import requests
from PIL import Image

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")

from sdtorch.server.background import BackgroundServer  # noqa: E402
from sdtorch.shapes.judge import judge  # noqa: E402
from sdtorch.shapes.world import Scene, render  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
# Offline-safe: no sandbox (root in a container), no GPU, nothing fetched in the background.
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}

# CI installs chromium (.ci/run), so there a missing browser fails rather than skips.
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists() and not os.environ.get("CI"),
                                reason="needs Debian's chromium (apt-get install chromium)")


@pytest.fixture(scope="module")
def server():
    with BackgroundServer(queue_size=4) as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))

    def only_loopback(route):  # anything else is refused, and recorded above
        host = urlparse(route.request.url).hostname
        if route.request.url.startswith("data:") or host in LOOPBACK:
            route.continue_()
        else:
            route.abort()

    page.route("**/*", only_loopback)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" and "Security Policy" in m.text else None)
    page.goto(server.url + "/")
    wait_until(page, "document.querySelector('#sampler').options.length > 0")
    yield page
    outside = [u for u in requested if not u.startswith("data:") and urlparse(u).hostname not in LOOPBACK]
    assert outside == [], outside
    assert errors == [], errors
    context.close()


def wait_until(page, expression: str, timeout: float = 120) -> None:
    """Poll a JavaScript expression (the page's Content-Security-Policy forbids the eval that Playwright's
    wait_for_function uses, and the page runs under it here, as it does for a user)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {expression}")
        time.sleep(0.02)


WATCH_PREVIEW = """() => {
    window.previews = [];
    const img = document.querySelector('img#preview');
    new MutationObserver(() => {
        if (!document.querySelector('img.result')) window.previews.push(img.src);
    }).observe(img, {attributes: true, attributeFilter: ['src']});
}"""


def _image(src: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


def test_generate_shows_the_picture_emerging_then_the_result(page, tmp_path):
    page.fill("#prompt", "a red circle on a blue background")
    page.fill("#steps", "24")
    page.fill("#seed", "1")
    page.evaluate(WATCH_PREVIEW)
    page.click("#generate")
    # Mid-generation: the screenshot for the README (its path given by SDTORCH_SCREENSHOT_DIR).
    wait_until(page, "window.previews.length >= 6 || document.querySelector('img.result')")
    shot = tmp_path / "serve-page.png"
    page.screenshot(path=str(shot))
    if os.environ.get("SDTORCH_SCREENSHOT_DIR"):
        shutil.copy(shot, Path(os.environ["SDTORCH_SCREENSHOT_DIR"]) / "serve-page.png")
    page.wait_for_selector("img.result", timeout=120_000)

    previews = page.evaluate("window.previews")
    distinct = [p for i, p in enumerate(previews) if p.startswith("data:image/png") and p not in previews[:i]]
    assert len(distinct) >= 3, len(distinct)  # the preview changed at least three times before the result
    frames = [np.asarray(_image(p).convert("RGB"), dtype=float) for p in distinct]
    assert max(np.abs(a - b).mean() for a, b in zip(frames, frames[1:])) > 1  # visibly different pictures

    result = page.get_attribute("img.result", "src")
    image = _image(result)
    assert image.size == (64, 64) and "Seed: 1," in image.info["parameters"]
    caption = page.inner_text(".result-item pre")
    assert caption.startswith("a red circle on a blue background") and "Steps: 24" in caption and "Seed: 1," in caption
    verdict = judge(np.asarray(image.convert("RGB")))
    assert (verdict.shape, verdict.colour) == ("circle", "red"), verdict
    assert "done" in page.inner_text("#progress")
    assert page.is_enabled("#generate") and not page.is_enabled("#interrupt")


def test_interrupt_stops_a_long_generation(page):
    page.fill("#prompt", "a green square")
    page.fill("#steps", "900")
    page.click("#generate")
    wait_until(page, "document.querySelector('#progress .text').textContent.startsWith('step ')")
    page.click("#interrupt")
    page.wait_for_selector("img.result", timeout=60_000)
    assert "interrupted" in page.inner_text("#progress")
    assert "partial" in page.inner_text(".result-item")
    recorded = int(page.inner_text(".result-item pre").split("Steps: ")[1].split(",")[0])
    assert recorded == 900  # the record is the request's (as A1111's); the picture is where it stopped


def test_dropping_a_png_fills_the_form(page, server):
    made = requests.post(server.url + "/sdapi/v1/txt2img", json={
        "prompt": "a blue star on a yellow background", "negative_prompt": "red", "steps": 3, "seed": 4242,
        "cfg_scale": 5.5, "width": 64, "height": 64, "sampler_name": "DPM++ 2M Karras"}).json()
    png = made["images"][0]
    page.evaluate("""(b64) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], 'made.png', {type: 'image/png'}));
        document.body.dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true}));
    }""", png)
    wait_until(page, "document.querySelector('#seed').value === '4242'", timeout=30)
    assert page.input_value("#prompt") == "a blue star on a yellow background"
    assert page.input_value("#negative") == "red"
    assert page.input_value("#steps") == "3" and page.input_value("#cfg") == "5.5"
    assert page.input_value("#sampler") == "dpmpp_2m" and page.input_value("#schedule") == "karras"
    # Not a PNG with parameters: one clear line, the form untouched.
    page.evaluate("""() => {
        const data = new DataTransfer();
        data.items.add(new File([new Uint8Array([1, 2, 3])], 'junk.bin'));
        document.body.dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true}));
    }""")
    wait_until(page, "document.querySelector('#message').classList.contains('error')", timeout=30)
    assert "junk.bin" in page.inner_text("#message") and page.input_value("#seed") == "4242"


def test_image_to_image_from_an_uploaded_picture(page, tmp_path):
    scene = Scene(shape="circle", colour="red", size="large", position="center", background="white")
    Image.fromarray(render(scene, 64)).save(tmp_path / "start.png")
    page.fill("#prompt", "a large blue circle on a white background")
    page.fill("#steps", "10")
    page.set_input_files("#init-image", str(tmp_path / "start.png"))
    wait_until(page, "!document.querySelector('#init-thumb').hidden")
    page.click("#generate")
    page.wait_for_selector("img.result", timeout=120_000)
    caption = page.inner_text(".result-item pre")
    assert "Denoising strength: 0.6" in caption and "Size: 64x64" in caption
    assert judge(np.asarray(_image(page.get_attribute("img.result", "src")).convert("RGB"))).position == "center"
