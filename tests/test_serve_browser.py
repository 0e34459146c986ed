"""The web page at / in a real browser: Debian's chromium, headless, driven by selenium.

Fills the form (prompt, image upload, two LoRA pickers with weights, a ControlNet),
generates, and checks that an image appears and that the adapters shown are the
requested ones; the page before a result (no empty image, the base's defaults), the
trigger words of the LoRA menu, the progress bar while the server holds a generation
after a given step, and that previews scale smoothly. Screenshots are saved (to
$LORAMGR_SCREENSHOT_DIR when set) and their elements compared to expectations, never to
pixel-exact goldens. Skipped with a reason when chromium or chromedriver is absent
(.ci/run installs them).
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from test_serve_support import free_port, serve_workspace

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")


@pytest.fixture(scope="module")
def server_url(tiny_workspace, tmp_path_factory):
    """The page's server in this process: its URL, workspace and Service (to pause a generation)."""
    import uvicorn

    from loramgr.serve import ServeConfig, create_app

    ws = serve_workspace(tiny_workspace, tmp_path_factory)
    port = free_port()
    app = create_app(ws, ServeConfig(port=port))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}", ws, app.state.service
    server.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def shots(tmp_path) -> Path:
    """Where the screenshots go: $LORAMGR_SCREENSHOT_DIR (to look at them), else the test's tmp folder."""
    folder = Path(os.environ.get("LORAMGR_SCREENSHOT_DIR", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def paused_after_step(service, step: int):
    """The next generation waits after denoising step ``step`` until the block ends (yields the Event
    set when it got there): the page's progress is looked at while the server holds still."""
    hook = service.engine.progress
    reached, release = threading.Event(), threading.Event()

    def gated(completed: int, total: int) -> None:
        hook(completed, total)  # what /sdapi/v1/progress answers from
        if completed == step:
            reached.set()
            release.wait(120)

    service.engine.progress = gated
    try:
        yield reached
    finally:
        release.set()
        service.engine.progress = hook


def _open(browser, url: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 120)
    browser.get(url + "/")
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    return wait


def test_page_before_a_result_shows_no_empty_image(server_url, browser, shots):
    from selenium.webdriver.common.by import By

    from loramgr.bases import OpenBase
    from loramgr.defaults import base_defaults

    url, ws, _ = server_url
    _open(browser, url)
    assert browser.find_element(By.ID, "placeholder").is_displayed()
    assert not browser.find_element(By.ID, "outputs").is_displayed()
    assert not browser.find_element(By.ID, "progress-box").is_displayed()
    # no <img> is shown without a picture (the broken-image icon)
    shown = [i for i in browser.find_elements(By.TAG_NAME, "img") if i.is_displayed()]
    assert all(i.get_attribute("src") for i in shown), [i.get_attribute("id") for i in shown]
    # the form holds the base's defaults (those of `loramgr run` on the tiny base)
    defaults = base_defaults(OpenBase.resolve(ws, "tiny"))
    assert browser.find_element(By.ID, "resolution").get_attribute("value") == str(defaults.resolution) == "128"
    assert browser.find_element(By.ID, "n_prompt").get_attribute("value") == defaults.n_prompt
    browser.save_screenshot(str(shots / "serve-page-empty.png"))


def test_lora_menu_labels_trigger_words(server_url, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    url, _, _ = server_url
    _open(browser, url)
    browser.find_element(By.ID, "add-lora").click()
    row = browser.find_element(By.CSS_SELECTOR, ".lora-row")
    menu = Select(row.find_element(By.CSS_SELECTOR, ".lora-name"))
    assert {o.get_attribute("value"): o.text for o in menu.options} == {
        "sv_a": "sv_a (trigger: blindbox)", "sv_b": "sv_b"}
    menu.select_by_value("sv_a")
    assert row.find_element(By.CSS_SELECTOR, ".lora-trigger").text.startswith("trigger words: blindbox")
    browser.find_element(By.ID, "prompt").send_keys("a house")
    row.find_element(By.CSS_SELECTOR, ".add-trigger").click()
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == "a house, blindbox"
    menu.select_by_value("sv_b")
    assert row.find_element(By.CSS_SELECTOR, ".lora-trigger").text == "no trigger words"


def test_page_generates_with_the_chosen_adapters(server_url, browser, shots):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select

    url, ws, service = server_url
    wait = _open(browser, url)
    assert "base tiny" in browser.find_element(By.ID, "server-meta").text

    browser.find_element(By.ID, "prompt").send_keys("a small house")
    browser.find_element(By.ID, "image").send_keys(str(Path(ws.home / "house.png").resolve()))
    wait.until(lambda d: (d.find_element(By.ID, "preview").get_attribute("src") or "").startswith("data:image/png"))
    for name, weight in (("sv_a", "0.8"), ("sv_b", "0.45")):
        browser.find_element(By.ID, "add-lora").click()
        row = browser.find_elements(By.CSS_SELECTOR, ".lora-row")[-1]
        Select(row.find_element(By.CSS_SELECTOR, ".lora-name")).select_by_value(name)
        slider = row.find_element(By.CSS_SELECTOR, ".lora-weight")
        browser.execute_script("arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'))",
                               slider, weight)
        assert row.find_element(By.TAG_NAME, "output").text == f"{float(weight):.2f}"
    Select(browser.find_element(By.ID, "control")).select_by_value("sv_hed")
    for field, value in (("steps", "3"), ("resolution", "64"), ("seed", "7")):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)

    # the progress bar follows the server's denoising steps: held after step 2 of 3, it shows 2 / 3
    with paused_after_step(service, 2) as reached:
        browser.find_element(By.ID, "generate").click()
        assert reached.wait(120), "the generation did not reach step 2"
        progress = browser.find_element(By.ID, "progress")
        wait.until(lambda d: progress.get_attribute("value") == "2")
        assert progress.is_displayed() and progress.get_attribute("max") == "3"
        assert browser.find_element(By.ID, "progress-text").text == "step 2 / 3"
        assert browser.find_element(By.ID, "generate").get_attribute("disabled")
        browser.save_screenshot(str(shots / "serve-page-progress.png"))

    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#images img.result")))
    image = browser.find_element(By.CSS_SELECTOR, "#images img.result")
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) == 64)
    assert not browser.find_element(By.ID, "progress-box").is_displayed()
    assert not browser.find_element(By.ID, "placeholder").is_displayed()
    assert browser.find_element(By.ID, "control-map").get_attribute("src").startswith("data:image/png;base64,")
    applied = [(li.get_attribute("data-name"), float(li.get_attribute("data-weight")))
               for li in browser.find_elements(By.CSS_SELECTOR, "#applied li.applied-adapter")]
    assert applied == [("sv_hed", 1.0), ("sv_a", 0.8), ("sv_b", 0.45)]
    assert "denoise" in browser.find_element(By.ID, "timings").text
    assert len(browser.find_elements(By.CSS_SELECTOR, "#gallery img")) == 1
    assert "error" not in (browser.find_element(By.ID, "status").get_attribute("class") or "")
    browser.save_screenshot(str(shots / "serve-page.png"))

    # a request the server refuses shows its reason (PNDM cannot make 2 steps)
    Select(browser.find_element(By.ID, "scheduler")).select_by_value("pndm")
    element = browser.find_element(By.ID, "steps")
    element.clear()
    element.send_keys("2")
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: "error" in (d.find_element(By.ID, "status").get_attribute("class") or ""))
    assert "scheduler" in browser.find_element(By.ID, "status").text
    assert not browser.find_element(By.ID, "progress-box").is_displayed()


def test_previews_scale_smoothly_so_thin_lines_stay(server_url, browser, shots):
    """A 512 px map of 1-pixel lines on every other row, shown in the 256 px preview: smooth scaling
    shows grey; nearest-neighbour (image-rendering: pixelated) keeps one row in two, all black or white."""
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _, _ = server_url
    _open(browser, url)
    lines = np.zeros((512, 512), np.uint8)
    lines[::2] = 255
    buffer = io.BytesIO()
    Image.fromarray(lines).save(buffer, "PNG")
    preview = browser.find_element(By.ID, "control-map")
    browser.execute_script("document.getElementById('placeholder').hidden = true;"
                           "document.getElementById('outputs').hidden = false;"
                           "arguments[0].src = arguments[1]", preview,
                           "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    WebDriverWait(browser, 30).until(
        lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", preview) == 512)
    assert preview.size == {"width": 256, "height": 256}
    shot = np.asarray(Image.open(io.BytesIO(preview.screenshot_as_png)).convert("L"), np.float32)
    (shots / "serve-preview-lines.png").write_bytes(preview.screenshot_as_png)
    inner = shot[16:-16, 16:-16]  # away from the rounded corners
    assert 64 < inner.mean() < 192 and inner.std() < 40, (inner.mean(), inner.std())
