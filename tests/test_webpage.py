"""The web page at /, in headless Chromium through Playwright: generate, live preview, reuse,
inpainting with a mask painted by mouse, and the X-ray view."""
import io
import os

import httpx
import numpy as np
import pytest
from PIL import Image
from serve_helpers import live_server, tiny_models  # noqa: F401

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=(
    f"no Chromium at {CHROMIUM}; install it with `apt-get install -y chromium` (the page test drives it "
    "through Playwright's Python package, which needs no browser download)"))
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no `playwright install`)")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def server(tiny_models):  # noqa: F811
    with live_server(tiny_models, max_steps=1000) as url:
        yield url


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        page.errors = []
        page.on("pageerror", lambda e: page.errors.append(str(e)))
        page.set_default_timeout(60_000)
        page.goto(server + "/")
        page.wait_for_function("document.querySelector('#sampler').options.length > 0")
        yield page
        browser.close()


def settings(page, prompt, size=32, steps=3, seed=None):
    page.fill("#prompt", prompt)
    page.fill("#width", str(size))
    page.fill("#height", str(size))
    page.fill("#steps", str(steps))
    if seed is not None:
        page.fill("#seed", str(seed))


def test_generate_shows_the_image_with_its_parameters_and_reuses_them(page):
    options = page.eval_on_selector_all("#sampler option", "os => os.map(o => o.value)")
    assert {"dpmpp_2m", "euler_a", "euler"} <= set(options)  # the list comes from the server
    assert page.input_value("#guidance_rescale") == "0"  # the model's default
    settings(page, "a red circle", seed=7)
    page.select_option("#sampler", "euler")
    page.fill("#guidance_rescale", "0.7")
    page.click("#generate")
    card = page.locator(".card").first
    card.wait_for()
    page.wait_for_function("document.querySelector('.card img').naturalWidth === 32")
    params = card.locator(".params").inner_text()
    assert "a red circle" in params and "Seed: 7" in params and "Sampler: Euler," in params
    assert "CFG Rescale phi: 0.7" in params
    assert page.inner_text("#status") == "done"
    page.fill("#prompt", "something else")
    page.fill("#seed", "-1")
    page.fill("#guidance_rescale", "0")
    card.get_by_text("reuse these settings").click()
    assert page.input_value("#prompt") == "a red circle" and page.input_value("#seed") == "7"
    assert page.input_value("#sampler") == "euler" and page.input_value("#guidance_rescale") == "0.7"
    assert not page.errors


def test_live_preview_and_progress_while_it_runs_then_cancel(page):
    settings(page, "a slow one", size=64, steps=1000)
    page.click("#generate")
    page.wait_for_function("!document.querySelector('#preview').hidden && "
                           "document.querySelector('#preview').naturalWidth === 64")
    assert page.eval_on_selector("#progress", "p => p.value") > 0
    assert page.inner_text("#status").startswith("step ")
    page.click("#cancel")
    page.wait_for_function("document.querySelector('#status').textContent === 'cancelled'")
    assert not page.errors


def test_inpaint_with_a_painted_mask(page, server):
    settings(page, "a red circle", seed=3)
    page.check("input[name=mode][value=txt2img]")
    page.click("#generate")
    page.wait_for_function("document.querySelector('.card .params').textContent.includes('Seed: 3,')")
    page.locator(".card").first.locator("button.edit").click()
    page.check("input[name=mode][value=inpaint]")
    page.wait_for_function("document.querySelector('#mask').width === 32")
    page.click("#generate")  # nothing painted yet
    assert "paint the part to regenerate" in page.inner_text("#error")
    box = page.locator("#mask").bounding_box()
    page.mouse.move(box["x"] + 0.1 * box["width"], box["y"] + 0.1 * box["height"])
    page.mouse.down()
    for k in range(1, 11):  # a stroke down the left part of the image
        page.mouse.move(box["x"] + 0.15 * box["width"], box["y"] + (0.1 + 0.08 * k) * box["height"])
    page.mouse.up()
    page.fill("#prompt", "a blue square")
    page.click("#generate")
    page.wait_for_function("document.querySelector('.card').dataset.kind === 'inpaint'")
    params = page.locator(".card").first.locator(".params").inner_text()
    assert "a blue square" in params and "Denoising strength: 1.0" in params
    # the server got the painted mask: the right side is the input's, the stroke was regenerated
    jobs = httpx.get(server + "/api/v1/jobs").json()
    inpaint = next(j for j in reversed(jobs) if j["kind"] == "inpaint")
    source = next(j for j in reversed(jobs) if j["kind"] == "txt2img" and j["seeds"] == [3])
    out, src = (np.asarray(Image.open(io.BytesIO(httpx.get(server + j["images"][0]).content)).convert("RGB"))
                for j in (inpaint, source))
    assert (out[:, 16:] == src[:, 16:]).all() and (out[:, :8] != src[:, :8]).any()
    page.click("#clear-mask")
    assert page.evaluate("maskDataUrl()") is None
    assert not page.errors


def test_xray_view(page):
    page.check("input[name=mode][value=txt2img]")
    settings(page, "a red circle left of a blue square")
    page.click("#xray")
    page.wait_for_selector("#xray-view:not([hidden]) #heatmaps figure")
    words = page.locator("#heatmaps figcaption").all_inner_texts()
    assert words[:3] == ["a", "red", "circle"]
    page.wait_for_function("document.querySelector('#trajectory').naturalWidth > 0 && "
                           "[...document.querySelectorAll('#heatmaps img')].every(i => i.naturalWidth > 0)")
    assert not page.errors
