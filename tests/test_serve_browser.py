"""The web page at / in a real browser: Debian's chromium, headless, driven by selenium.

Fills the form (prompt, image upload, two LoRA pickers with weights, a ControlNet),
generates, and checks that an image appears and that the adapters shown are the
requested ones. Skipped with a reason when chromium or chromedriver is absent
(.ci/run installs them).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from test_serve_support import free_port, serve_workspace

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")


@pytest.fixture(scope="module")
def server_url(tiny_workspace, tmp_path_factory):
    import uvicorn

    from loramgr.serve import ServeConfig, create_app

    ws = serve_workspace(tiny_workspace, tmp_path_factory)
    port = free_port()
    config = uvicorn.Config(create_app(ws, ServeConfig(port=port)), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}", ws
    server.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_page_generates_with_the_chosen_adapters(server_url, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url, ws = server_url
    wait = WebDriverWait(browser, 120)
    browser.get(url + "/")
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
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
    browser.find_element(By.ID, "generate").click()

    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#images img.result")))
    image = browser.find_element(By.CSS_SELECTOR, "#images img.result")
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) == 64)
    assert browser.find_element(By.ID, "control-map").get_attribute("src").startswith("data:image/png;base64,")
    applied = [(li.get_attribute("data-name"), float(li.get_attribute("data-weight")))
               for li in browser.find_elements(By.CSS_SELECTOR, "#applied li.applied-adapter")]
    assert applied == [("sv_hed", 1.0), ("sv_a", 0.8), ("sv_b", 0.45)]
    assert "denoise" in browser.find_element(By.ID, "timings").text
    assert len(browser.find_elements(By.CSS_SELECTOR, "#gallery img")) == 1
    assert "error" not in (browser.find_element(By.ID, "status").get_attribute("class") or "")
    shot = Path(os.environ.get("LORAMGR_SCREENSHOT_DIR", tmp_path)) / "serve-page.png"
    browser.save_screenshot(str(shot))

    # a request the server refuses shows its reason (PNDM cannot make 2 steps)
    Select(browser.find_element(By.ID, "scheduler")).select_by_value("pndm")
    element = browser.find_element(By.ID, "steps")
    element.clear()
    element.send_keys("2")
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: "error" in (d.find_element(By.ID, "status").get_attribute("class") or ""))
    assert "scheduler" in browser.find_element(By.ID, "status").text
