"""The web page at / in a real browser: Debian's chromium, headless, driven by selenium.

Fills the form (prompt, image upload, two LoRA pickers with weights, two ControlNet units with
their own settings), generates, and checks the body the page sent (read by wrapping the page's
fetch), the settings the server answered with, and the page's result: an image, each unit's
control map, the adapters applied. Also: no unit at all (`controls: []`, a size, a hires fix;
an inpainting mask), the page before a result (no empty image, the base's defaults, the
scheduler and schedule pickers from /v1/config, the unit limit), the trigger words of the LoRA
menu and the embeddings' "add to prompt", server errors shown next to the field they name, the
progress bar while the server holds a generation after a given step, and that previews scale
smoothly. Tiny base, 64 px, 2-3 steps. Screenshots are saved (to $LORAMGR_SCREENSHOT_DIR when
set) and their elements compared to expectations, never to pixel-exact goldens. Skipped with a
reason when chromium or chromedriver is absent (.ci/run installs them).
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

from serve_support import free_port, serve_workspace

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")


@pytest.fixture(scope="module")
def page_workspace(tiny_workspace, tmp_path_factory):
    """The serve tests' adapters and house picture, plus an embedding, the house transposed (a unit's own image)
    and an inpainting mask: a workspace of its own, since the other serve tests expect no embedding."""
    import torch
    from PIL import Image

    from format_writers import a1111_embedding
    from loramgr.convert import convert_adapter
    from loramgr.workspace import Workspace

    shared = serve_workspace(tiny_workspace, tmp_path_factory)
    home = tmp_path_factory.mktemp("browser_ws")
    (home / "base_models").mkdir()
    os.symlink(tiny_workspace.base_dir("tiny"), home / "base_models" / "tiny")
    shutil.copytree(shared.adapters, home / "adapters")
    shutil.copy(shared.home / "house.png", home / "house.png")
    house = np.asarray(Image.open(home / "house.png"))
    Image.fromarray(np.ascontiguousarray(house.transpose(1, 0, 2))).save(home / "house_t.png")
    mask = np.zeros(house.shape[:2], np.uint8)
    mask[24:72, 24:72] = 255
    Image.fromarray(mask).save(home / "mask.png")
    ws = Workspace.resolve(home)
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(5))  # 2 vectors of the tiny text width
    convert_adapter(ws, a1111_embedding(tmp_path_factory.mktemp("sources") / "easyneg.pt", vectors), base="tiny")
    return ws


@pytest.fixture(scope="module")
def server_url(page_workspace):
    """The page's server in this process: its URL, workspace and Service (to pause a generation)."""
    import uvicorn

    from loramgr.serve import ServeConfig, create_app

    ws = page_workspace
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


def _screenshot(browser, path: Path) -> None:
    """The whole page, to look at: the window made as tall as the page for the shot."""
    size = browser.get_window_size()
    chrome = browser.execute_script("return window.outerHeight - window.innerHeight")
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(size["width"], max(size["height"], height + chrome))
    browser.save_screenshot(str(path))
    browser.set_window_size(size["width"], size["height"])


def _record_requests(browser) -> None:
    """Wrap the page's fetch: each body it POSTs to /v1/generate, with the server's answer, goes to window.sent."""
    browser.execute_script("""
        window.sent = [];
        const original = window.fetch;
        window.fetch = async (url, options) => {
          const response = await original(url, options);
          if (url === "/v1/generate") {
            window.sent.push({body: JSON.parse(options.body), status: response.status,
                              answer: await response.clone().json()});
          }
          return response;
        };""")


def _type(element, value: str) -> None:
    element.clear()
    element.send_keys(value)


def _set_unit(browser, index: int, image: Path | None = None, **fields: str) -> None:
    """Fill ControlNet unit ``index``: its own ``image`` file, and fields by their request names."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    unit = browser.find_elements(By.CSS_SELECTOR, "#units .unit")[index]
    for key, value in fields.items():
        element = unit.find_element(By.CSS_SELECTOR, f"[data-key={key}]")
        if element.tag_name == "select":
            Select(element).select_by_value(value)
        else:
            _type(element, value)
    if image is not None:
        unit.find_element(By.CSS_SELECTOR, ".unit-image").send_keys(str(image.resolve()))
        preview = unit.find_element(By.CSS_SELECTOR, ".unit-preview")
        WebDriverWait(browser, 30).until(lambda d: (preview.get_attribute("src") or "").startswith("data:image/png"))


def _data_url(path: Path) -> str:
    """What the page sends for a chosen file: FileReader's data: URL of its bytes."""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _png(src: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))))


def test_page_before_a_result_shows_no_empty_image(server_url, browser, shots):
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

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
    # the scheduler and schedule pickers hold /v1/config's names, its defaults chosen
    config = httpx.get(url + "/v1/config").json()
    for name, values in (("scheduler", config["schedulers"]), ("schedule", config["schedules"])):
        picker = Select(browser.find_element(By.ID, name))
        assert [o.get_attribute("value") for o in picker.options] == values and len(values) > 5
        assert picker.first_selected_option.get_attribute("value") == config["defaults"][name]
    assert [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "prompt_syntax")).options] == [
        "a1111", "plain"]
    assert browser.find_element(By.ID, "clip_skip").get_attribute("value") == "1"
    # one ControlNet unit by default, on the input image, with the request model's unit defaults; no size fields
    units = browser.find_elements(By.CSS_SELECTOR, "#units .unit")
    assert len(units) == 1
    unit = {key: units[0].find_element(By.CSS_SELECTOR, f"[data-key={key}]").get_attribute("value")
            for key in ("name", "preprocessor", "strength", "start", "end", "mode")}
    assert unit == {"name": "canny", "preprocessor": "canny", "strength": "1", "start": "0", "end": "1",
                    "mode": "balanced"}
    assert units[0].find_element(By.CSS_SELECTOR, ".unit-uses").text == "the input image"
    assert not browser.find_element(By.ID, "width").is_displayed()
    # units up to the server's --max-controlnets (/v1/config limits)
    assert config["limits"]["max_controlnets"] == 3
    add = browser.find_element(By.ID, "add-unit")
    add.click()
    add.click()
    assert len(browser.find_elements(By.CSS_SELECTOR, "#units .unit")) == 3 and not add.is_enabled()
    assert browser.find_element(By.ID, "unit-count").text == "3 / 3"
    _screenshot(browser, shots / "serve-page-empty.png")


def test_lora_menu_labels_trigger_words(server_url, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    url, _, _ = server_url
    _open(browser, url)
    browser.find_element(By.ID, "add-lora").click()
    row = browser.find_element(By.CSS_SELECTOR, ".lora-row")
    menu = Select(row.find_element(By.CSS_SELECTOR, ".lora-name"))
    labels = {o.get_attribute("value"): o.text for o in menu.options}  # others' uploads may be listed too
    assert {name: labels.get(name) for name in ("sv_a", "sv_b")} == {"sv_a": "sv_a (trigger: blindbox)", "sv_b": "sv_b"}
    menu.select_by_value("sv_a")
    assert row.find_element(By.CSS_SELECTOR, ".lora-trigger").text.startswith("trigger words: blindbox")
    browser.find_element(By.ID, "prompt").send_keys("a house")
    row.find_element(By.CSS_SELECTOR, ".add-trigger").click()
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == "a house, blindbox"
    menu.select_by_value("sv_b")
    assert row.find_element(By.CSS_SELECTOR, ".lora-trigger").text == "no trigger words"


def test_embeddings_listed_with_add_to_prompt(server_url, browser):
    """The workspace's embeddings (with their vector counts) and the prompt syntax hint."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    url, _, _ = server_url
    _open(browser, url)
    hint = browser.find_element(By.ID, "prompt-hint")
    assert "(word:1.2)" in hint.text and "BREAK" in hint.text and "embedding" in hint.text
    lines = browser.find_elements(By.CSS_SELECTOR, "#embeddings .embedding")
    assert [line.get_attribute("data-name") for line in lines] == ["easyneg"]
    assert lines[0].text.startswith("easyneg (2 vectors)")
    browser.find_element(By.ID, "prompt").send_keys("a house")
    lines[0].find_element(By.CSS_SELECTOR, ".add-embedding[data-target=prompt]").click()
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == "a house, easyneg"
    negative = browser.find_element(By.ID, "n_prompt").get_attribute("value")
    lines[0].find_element(By.CSS_SELECTOR, ".add-embedding[data-target=n_prompt]").click()
    assert browser.find_element(By.ID, "n_prompt").get_attribute("value") == negative + ", easyneg"
    # plain syntax reads no embeddings: the list goes, the hint says so
    Select(browser.find_element(By.ID, "prompt_syntax")).select_by_value("plain")
    assert not browser.find_element(By.ID, "embeddings").is_displayed()
    assert "at most 75 tokens" in hint.text


def test_page_generates_with_two_units_and_the_chosen_adapters(server_url, browser, shots):
    """Two ControlNet units (sv_hed on the input image for the first half of the steps; canny on its own image,
    the input transposed, in control mode) and two LoRAs: the body the page sent, the server's settings, the two
    control maps shown (the second the transpose of the first: each unit made its map from its own image)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    url, ws, service = server_url
    wait = _open(browser, url)
    _record_requests(browser)
    assert "base tiny" in browser.find_element(By.ID, "server-meta").text

    browser.find_element(By.ID, "prompt").send_keys("a small house")
    browser.find_element(By.ID, "image").send_keys(str((ws.home / "house.png").resolve()))
    wait.until(lambda d: (d.find_element(By.ID, "preview").get_attribute("src") or "").startswith("data:image/png"))
    for name, weight in (("sv_a", "0.8"), ("sv_b", "0.45")):
        browser.find_element(By.ID, "add-lora").click()
        row = browser.find_elements(By.CSS_SELECTOR, ".lora-row")[-1]
        Select(row.find_element(By.CSS_SELECTOR, ".lora-name")).select_by_value(name)
        slider = row.find_element(By.CSS_SELECTOR, ".lora-weight")
        browser.execute_script("arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'))",
                               slider, weight)
        assert row.find_element(By.TAG_NAME, "output").text == f"{float(weight):.2f}"
    _set_unit(browser, 0, name="sv_hed", strength="0.8", end="0.5")
    browser.find_element(By.ID, "add-unit").click()
    _set_unit(browser, 1, image=ws.home / "house_t.png", strength="0.6", start="0.25", mode="control")
    second = browser.find_elements(By.CSS_SELECTOR, "#units .unit")[1]
    assert not second.find_element(By.CSS_SELECTOR, ".unit-uses").is_displayed()
    assert second.find_element(By.CSS_SELECTOR, ".unit-use-input").is_displayed()
    for field, value in (("steps", "3"), ("resolution", "64"), ("seed", "7"), ("clip_skip", "2")):
        _type(browser.find_element(By.ID, field), value)

    # the progress bar follows the server's denoising steps: held after step 2 of 3, it shows 2 / 3
    with paused_after_step(service, 2) as reached:
        browser.find_element(By.ID, "generate").click()
        assert reached.wait(120), "the generation did not reach step 2"
        progress = browser.find_element(By.ID, "progress")
        wait.until(lambda d: progress.get_attribute("value") == "2")
        assert progress.is_displayed() and progress.get_attribute("max") == "3"
        assert browser.find_element(By.ID, "progress-text").text == "step 2 / 3"
        assert browser.find_element(By.ID, "generate").get_attribute("disabled")
        _screenshot(browser, shots / "serve-page-progress.png")

    wait.until(lambda d: d.execute_script("return window.sent.length") == 1)
    (sent,) = browser.execute_script("return window.sent")
    body, answer = sent["body"], sent["answer"]
    assert sent["status"] == 200, answer
    assert body["controls"] == [
        {"name": "sv_hed", "preprocessor": "canny", "strength": 0.8, "start": 0, "end": 0.5, "mode": "balanced"},
        {"name": "canny", "preprocessor": "canny", "strength": 0.6, "start": 0.25, "end": 1, "mode": "control",
         "image": _data_url(ws.home / "house_t.png")}]
    assert body["image"] == _data_url(ws.home / "house.png")
    assert body["loras"] == [{"name": "sv_a", "weight": 0.8}, {"name": "sv_b", "weight": 0.45}]
    assert {k: body[k] for k in ("steps", "resolution", "seed", "clip_skip", "prompt_syntax", "scheduler")} == {
        "steps": 3, "resolution": 64, "seed": 7, "clip_skip": 2, "prompt_syntax": "a1111", "scheduler": "ddim"}
    assert not {"width", "height", "hires", "mask", "img2img_strength"} & set(body)
    # the server generated with both units as sent
    assert answer["controls"] == ["sv_hed", "canny"] and answer["settings"]["clip_skip"] == 2
    assert [(u["controlnet"], u["strength"], u["start"], u["end"], u["mode"]) for u in answer["settings"]["units"]] == [
        ("sv_hed", 0.8, 0.0, 0.5, "balanced"), ("canny", 0.6, 0.25, 1.0, "control")]

    image = browser.find_element(By.CSS_SELECTOR, "#images img.result")
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) == 64)
    assert not browser.find_element(By.ID, "progress-box").is_displayed()
    assert not browser.find_element(By.ID, "placeholder").is_displayed()
    maps = browser.find_elements(By.CSS_SELECTOR, "#control-maps img.control-map")
    assert [m.find_element(By.XPATH, "following-sibling::figcaption").text for m in maps] == [
        "unit 1 map: sv_hed", "unit 2 map: canny"]
    assert all(m.is_displayed() for m in maps)
    first, second_map = (_png(m.get_attribute("src")) for m in maps)
    assert first.shape[:2] == (64, 64) and first.any()
    np.testing.assert_array_equal(second_map, first.transpose(1, 0, *range(2, first.ndim)))
    applied = [(li.get_attribute("data-name"), float(li.get_attribute("data-weight")))
               for li in browser.find_elements(By.CSS_SELECTOR, "#applied li.applied-adapter")]
    assert applied == [("sv_hed", 1.0), ("sv_a", 0.8), ("sv_b", 0.45)]
    assert "denoise" in browser.find_element(By.ID, "timings").text
    assert len(browser.find_elements(By.CSS_SELECTOR, "#gallery img")) == 1
    assert "error" not in (browser.find_element(By.ID, "status").get_attribute("class") or "")
    _screenshot(browser, shots / "serve-page.png")


def test_page_without_units_sends_none_with_its_passes(server_url, browser, shots):
    """No unit: `controls: []`; text to image at a given size with a hires fix (64 px, upscaled to 128), then an
    inpainting of the input image (its mask and denoise strength, from the collapsed "More" section)."""
    from selenium.webdriver.common.by import By

    url, ws, _ = server_url
    wait = _open(browser, url)
    _record_requests(browser)
    browser.find_element(By.ID, "prompt").send_keys("a house")
    browser.find_element(By.CSS_SELECTOR, "#units .unit-remove").click()
    assert not browser.find_elements(By.CSS_SELECTOR, "#units .unit")
    assert browser.find_element(By.ID, "no-units").is_displayed()
    for field, value in (("steps", "2"), ("width", "64"), ("height", "64")):
        _type(browser.find_element(By.ID, field), value)
    browser.find_element(By.CSS_SELECTOR, "#more > summary").click()
    browser.find_element(By.ID, "hires").click()
    for field, value in (("hires-scale", "2"), ("hires-strength", "0.5"), ("hires-steps", "2")):
        _type(browser.find_element(By.ID, field), value)
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: d.execute_script("return window.sent.length") == 1)
    sent = browser.execute_script("return window.sent")[0]
    assert sent["status"] == 200, sent["answer"]
    body = sent["body"]
    assert body["controls"] == [] and (body["width"], body["height"]) == (64, 64)
    assert body["hires"] == {"scale": 2, "strength": 0.5, "steps": 2}
    assert "image" not in body and "mask" not in body
    image = browser.find_element(By.CSS_SELECTOR, "#images img.result")
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) == 128)
    assert not browser.find_elements(By.CSS_SELECTOR, "#control-maps img")
    assert browser.find_element(By.ID, "applied").text == "none (the plain base, no ControlNet)"
    _screenshot(browser, shots / "serve-page-no-units.png")

    # inpainting: the input image, a mask and a denoise strength; no hires (it does not combine with a mask)
    browser.find_element(By.ID, "hires").click()
    browser.find_element(By.ID, "image").send_keys(str((ws.home / "house.png").resolve()))
    browser.find_element(By.ID, "mask").send_keys(str((ws.home / "mask.png").resolve()))
    wait.until(lambda d: (d.find_element(By.ID, "mask-preview").get_attribute("src") or "").startswith("data:"))
    _type(browser.find_element(By.ID, "img2img_strength"), "0.75")
    _type(browser.find_element(By.ID, "resolution"), "64")
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: d.execute_script("return window.sent.length") == 2)
    sent = browser.execute_script("return window.sent")[1]
    assert sent["status"] == 200, sent["answer"]
    body = sent["body"]
    assert body["controls"] == [] and body["img2img_strength"] == 0.75
    assert body["image"] == _data_url(ws.home / "house.png") and body["mask"] == _data_url(ws.home / "mask.png")
    assert not {"width", "height", "hires"} & set(body)
    assert sent["answer"]["settings"]["img2img_strength"] == 0.75 and sent["answer"]["width"] == 64
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img")) == 2)


def test_server_errors_show_next_to_their_field(server_url, browser, shots):
    """A 4xx names a field: its reason is shown right after that field's input, which is marked."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    url, ws, _ = server_url
    wait = _open(browser, url)
    browser.find_element(By.ID, "prompt").send_keys("a house")

    def error_after(field: str):
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f'.field-error[data-for="{field}"]'))
        assert "error" in browser.find_element(By.ID, "status").get_attribute("class")
        notes = browser.find_elements(By.CSS_SELECTOR, ".field-error")
        assert [n.get_attribute("data-for") for n in notes] == [field]
        assert notes[0].is_displayed() and notes[0].text.startswith(field + ": ")
        target = notes[0].find_element(By.XPATH, "preceding-sibling::*[1]")
        assert "invalid" in target.get_attribute("class") and target.get_attribute("data-field") == field
        return notes[0], target

    # the unit takes the input image, and there is none: the unit's image field is named
    browser.find_element(By.ID, "generate").click()
    note, target = error_after("controls.0.image")
    assert "required" in note.text and "unit-image" in target.get_attribute("class")
    _screenshot(browser, shots / "serve-page-error.png")

    # a schedule the scheduler cannot take: next to the schedule picker (the unit's error is gone)
    browser.find_element(By.ID, "image").send_keys(str((ws.home / "house.png").resolve()))
    wait.until(lambda d: (d.find_element(By.ID, "preview").get_attribute("src") or "").startswith("data:image/png"))
    Select(browser.find_element(By.ID, "scheduler")).select_by_value("ddim")
    Select(browser.find_element(By.ID, "schedule")).select_by_value("karras")
    browser.find_element(By.ID, "generate").click()
    note, target = error_after("schedule")
    assert target.get_attribute("id") == "schedule" and "karras" in note.text
    assert not browser.find_element(By.ID, "progress-box").is_displayed()

    # a field inside the collapsed "More": it opens (a hires scale giving a 160 px second pass)
    Select(browser.find_element(By.ID, "schedule")).select_by_value("automatic")
    more = browser.find_element(By.ID, "more")
    more.find_element(By.TAG_NAME, "summary").click()
    browser.find_element(By.ID, "hires").click()
    _type(browser.find_element(By.ID, "hires-scale"), "1.25")
    more.find_element(By.TAG_NAME, "summary").click()
    assert not more.get_attribute("open")
    browser.find_element(By.ID, "generate").click()
    note, target = error_after("hires")
    assert target.get_attribute("id") == "hires-box" and "multiples of 64" in note.text and more.get_attribute("open")


def test_previews_scale_smoothly_so_thin_lines_stay(server_url, browser, shots):
    """A 512 px map of 1-pixel lines on every other row, shown in the 256 px preview: smooth scaling
    shows grey; nearest-neighbour (image-rendering: pixelated) keeps one row in two, all black or white."""
    from PIL import Image
    from selenium.webdriver.support.ui import WebDriverWait

    url, _, _ = server_url
    _open(browser, url)
    lines = np.zeros((512, 512), np.uint8)
    lines[::2] = 255
    buffer = io.BytesIO()
    Image.fromarray(lines).save(buffer, "PNG")
    preview = browser.execute_script(
        "document.getElementById('placeholder').hidden = true;"
        "document.getElementById('outputs').hidden = false;"
        "const img = document.createElement('img'); img.className = 'control-map'; img.src = arguments[0];"
        "document.getElementById('control-maps').append(img); return img;",
        "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    WebDriverWait(browser, 30).until(
        lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", preview) == 512)
    assert preview.size == {"width": 256, "height": 256}
    shot = np.asarray(Image.open(io.BytesIO(preview.screenshot_as_png)).convert("L"), np.float32)
    (shots / "serve-preview-lines.png").write_bytes(preview.screenshot_as_png)
    inner = shot[16:-16, 16:-16]  # away from the rounded corners
    assert 64 < inner.mean() < 192 and inner.std() < 40, (inner.mean(), inner.std())
