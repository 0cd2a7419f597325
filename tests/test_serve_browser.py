"""The page at / in a real browser: Debian's Chromium driven by Playwright (never `playwright
install`: nothing is downloaded). It generates a digit, watches the progress bar move and the image
appear, and recalls the parameters from the result. Skipped where /usr/bin/chromium is absent."""

from __future__ import annotations

import base64
import os

import pytest
from helpers_serve import running_server

from coreml_sd.serve.config import ServeConfig

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]

# Records every value the progress bar takes (its `value` attribute follows the property).
WATCH_PROGRESS = """() => {
  window.seenProgress = [];
  const bar = document.getElementById('progress');
  new MutationObserver(() => window.seenProgress.push(bar.value))
    .observe(bar, {attributes: true, attributeFilter: ['value']});
}"""


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    config = ServeConfig(port=0, output=tmp_path_factory.mktemp("out"), device="cpu", precision="fp32")
    with running_server(config) as running:
        yield running


def test_page_generates_shows_progress_and_recalls_parameters(browser, server, tmp_path):
    page = browser.new_page()
    requested = []
    page.on("request", lambda r: requested.append(r.url))
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('sampler_name').options.length > 0")
    assert page.input_value("#width") == "32"  # the built-in model's native size, from the server
    img2img = page.request.get(server.url + "/coreml-sd/v1/info").json()["img2img"]
    assert page.is_disabled("#init_image") is not img2img  # uploads only where the pipeline takes them
    page.fill("#prompt", "a handwritten digit seven")
    page.fill("#steps", "150")
    page.fill("#seed", "11")
    page.select_option("#sampler_name", "Euler")
    page.evaluate(WATCH_PROGRESS)
    page.click("#generate")
    page.wait_for_selector("figure.result img", timeout=120_000)
    seen = page.evaluate("window.seenProgress")
    assert any(0 < v < 1 for v in seen) and seen == sorted(seen) and seen[-1] == 1  # it moved, forwards
    size = page.evaluate("(() => { const i = document.querySelector('figure.result img');"
                         " return [i.naturalWidth, i.naturalHeight]; })()")
    assert size == [32, 32]
    caption = page.text_content("figure.result pre")
    assert "Seed: 11" in caption and "Steps: 150" in caption and "Sampler: Euler," in caption
    href = page.get_attribute("figure.result a.download", "href")
    assert href.startswith("/coreml-sd/v1/outputs/") and page.request.get(server.url + href).ok

    # change the form, then recall: the parameters come back from the image's own PNG chunk
    page.fill("#prompt", "something else")
    page.fill("#seed", "-1")
    page.fill("#steps", "3")
    page.select_option("#sampler_name", "Euler a")
    page.click("figure.result button.use-parameters")
    page.wait_for_function("document.getElementById('prompt').value === 'a handwritten digit seven'")
    assert (page.input_value("#seed"), page.input_value("#steps"), page.input_value("#sampler_name")) == \
        ("11", "150", "Euler")

    # the same through a dropped file (the drop zone's file input runs the same code)
    src = page.get_attribute("figure.result img", "src")
    dropped = tmp_path / "dropped.png"
    dropped.write_bytes(base64.b64decode(src.split(",", 1)[1]))
    page.fill("#prompt", "x")
    page.set_input_files("#png-info", str(dropped))
    page.wait_for_function("document.getElementById('prompt').value === 'a handwritten digit seven'")
    assert "Seed: 11" in page.text_content("#png-info-text")

    # reuse seed
    page.fill("#seed", "-1")
    page.click("#reuse-seed")
    assert page.input_value("#seed") == "11"
    # everything the page loaded came from this server: it works offline
    assert requested and all(u.startswith((server.url, "data:")) for u in requested)
    page.close()
