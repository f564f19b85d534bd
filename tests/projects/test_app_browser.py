"""The web demo in a real browser: app.py serves the smoke model (random weights) on 127.0.0.1 and headless Chromium
(Debian's chromium and chromium-driver; scripts/install_browser.sh installs them, `make test-all` runs it) uploads
photos, moves the rho slider and compares rho, as a person would. Screenshots go to output/app_browser_test/.

Skipped only where Chromium is not installed (the script could not install it: not root, no apt-get).
"""

import base64
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import List

import cv2
import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from sparse_detr import setup_cfg
from sparse_detr.data.datasets import SyntheticShapesSpec, render_synthetic_image
from sparse_detr.modeling.token_selection import num_selected_tokens

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "projects" / "SparseDETR" / "app.py"
SMOKE = str(ROOT / "configs" / "demo" / "sparse_detr_shapes_smoke.yaml")
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOTS = ROOT / "output" / "app_browser_test"
# the flags that run Chromium here: no sandbox (root in a container), no GPU, nothing fetched from outside
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
)
START_SECONDS, WAIT_SECONDS = 240, 120


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("app_browser")


@pytest.fixture(scope="module")
def browser(workdir):
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        pytest.skip(
            f"{' and '.join(missing)} not found: Chromium could not be installed here (scripts/install_browser.sh "
            "installs Debian's chromium and chromium-driver; it needs root and apt-get)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tempfile.mkdtemp(dir=workdir, prefix='chromium_profile_')}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_SECONDS)
    yield driver
    driver.quit()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page_url(workdir) -> str:
    """app.py started from the command line on random weights of the smoke config; its URL once it answers."""
    weights = workdir / "smoke.pth"
    torch.manual_seed(0)
    torch.save({"model": build_model(setup_cfg(SMOKE)).state_dict()}, weights)
    port = _free_port()
    log_path = workdir / "app.log"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(APP), "--config-file", SMOKE, "--port", str(port), "MODEL.WEIGHTS", str(weights)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + START_SECONDS
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"app.py exited with status {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"app.py did not answer at {url} in {START_SECONDS} s:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait(driver, condition, what: str, seconds: float = WAIT_SECONDS):
    # an element the page re-renders while it is read goes stale: read it again at the next poll
    wait = WebDriverWait(driver, seconds, poll_frequency=0.2, ignored_exceptions=(StaleElementReferenceException,))
    return wait.until(condition, message=f"waiting for {what}")


def _cells(driver, elem_id: str) -> List[List[str]]:
    """The body rows of the first table in the element ``elem_id``, as cell texts (read in one script, so a table
    that the page is replacing is read whole or not at all)."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]), row => Array.from(row.cells, c => c.innerText))",
        f"#{elem_id} table tbody tr",
    )


def _upload(driver, path: Path) -> None:
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#photo input[type=file]"), "the photo upload")
    driver.find_element(By.CSS_SELECTOR, "#photo input[type=file]").send_keys(str(path))


def _image_shown(driver, elem_id: str) -> bool:
    """The element's picture has loaded and has pixels (not a broken image)."""
    return driver.execute_script(
        "const img = document.querySelector(arguments[0]); return !!img && img.complete && img.naturalWidth > 0;",
        f"#{elem_id} img",
    )


def _screenshot(driver, name: str) -> Path:
    """The whole page, beyond the window, as output/app_browser_test/<name>.png."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
    )
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


def _kept(row: List[str]) -> tuple:
    kept, total = row[1].split(" (")[0].split(" / ")
    return int(kept), int(total)


def test_upload_slide_rho_and_compare(browser, page_url, workdir):
    photo = workdir / "shapes.png"
    image, _ = render_synthetic_image(SyntheticShapesSpec(num_images=1, seed=7), 0)
    cv2.imwrite(str(photo), image[:, :, ::-1])
    browser.get(page_url)
    _upload(browser, photo)
    _wait(browser, lambda d: _cells(d, "stats") and _cells(d, "stats")[0][0] == "0.30", "the table at rho 0.30")
    kept_low, total = _kept(_cells(browser, "stats")[0])
    assert kept_low == int(num_selected_tokens(torch.tensor([total]), 0.3))
    for elem_id in ("detections", "kept", "saliency"):
        _wait(browser, lambda d, e=elem_id: _image_shown(d, e), f"the {elem_id} picture")
    assert "model input: 64 x 64 px, from the photo's 128 x 128 px" in browser.find_element(By.ID, "stats").text

    # the picture renders: the screenshot of the detections panel is the drawn photo, not a blank area
    panel = cv2.imdecode(np.frombuffer(browser.find_element(By.ID, "detections").screenshot_as_png, np.uint8), 1)
    assert panel is not None and panel.std() > 20
    _screenshot(browser, "rho_0.30")

    # the slider, moved by keyboard as a person would: 10 steps of 0.05 up
    slider = browser.find_element(By.CSS_SELECTOR, "#rho input[type=range]")
    for _ in range(10):
        slider.send_keys(Keys.ARROW_RIGHT)
    _wait(browser, lambda d: _cells(d, "stats") and _cells(d, "stats")[0][0] == "0.80", "the table at rho 0.80")
    kept_high, same_total = _kept(_cells(browser, "stats")[0])
    assert same_total == total and kept_high == int(num_selected_tokens(torch.tensor([total]), 0.8))
    assert kept_high > kept_low

    browser.find_element(By.ID, "compare").click()
    _wait(browser, lambda d: len(_cells(d, "compare-table")) == 7, "the compare table")
    rows = _cells(browser, "compare-table")
    assert [row[0] for row in rows] == ["0.05", "0.10", "0.20", "0.30", "0.50", "0.75", "1.00"]
    kept = [int(row[1].split(" / ")[0]) for row in rows]
    assert kept == sorted(kept) and kept[0] < kept[-1] == total
    assert all(row[2].endswith(" ms") and float(row[2][:-3]) > 0 for row in rows)
    _wait(browser, lambda d: _image_shown(d, "compare-plot"), "the compare plot")
    path = _screenshot(browser, "compare")
    assert cv2.imread(str(path)) is not None
    assert "Traceback" not in browser.find_element(By.TAG_NAME, "body").text
    # everything the page loaded came from the app on 127.0.0.1: no fonts, scripts or telemetry from outside
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and [url for url in loaded if not url.startswith(page_url)] == []


def test_bad_uploads_get_a_message(browser, page_url, workdir):
    def body() -> str:
        return browser.find_element(By.TAG_NAME, "body").text

    # an image file name, but not an image: the browser accepts it, the server cannot decode it
    broken = workdir / "broken.jpg"
    broken.write_text("not a picture")
    browser.get(page_url)
    _upload(browser, broken)
    _wait(browser, lambda d: "broken.jpg is not an image this page can read" in body(), "the message on broken.jpg")
    _screenshot(browser, "broken_upload")
    assert "Traceback" not in body()

    # a grayscale photo runs, and the page says what was done to it
    gray = workdir / "gray.png"
    cv2.imwrite(
        str(gray), cv2.cvtColor(render_synthetic_image(SyntheticShapesSpec(num_images=1), 0)[0], cv2.COLOR_RGB2GRAY)
    )
    browser.get(page_url)
    _upload(browser, gray)
    _wait(browser, lambda d: "grayscale image (mode L)" in d.find_element(By.ID, "stats").text, "the grayscale note")
    assert _kept(_cells(browser, "stats")[0])[0] > 0
