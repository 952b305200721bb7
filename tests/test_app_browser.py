"""The real app in headless Chromium: preview an adapter, merge two, preview the merge.

Starts ``pixart-tune app`` as its own process on 127.0.0.1 with the tiny model and
two adapters with seeded random weights, and drives it through the page as a user
would. Screenshots are written under the test's temporary folder (printed) and
into tests/artifacts/.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_app import make_adapter

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="no system Chromium (apt-get install chromium); no browser is downloaded"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(url: str, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the app exited with code {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"the app did not answer at {url} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen) -> None:
    """By the app's own PID: it may ignore SIGTERM for a few seconds."""
    process.terminate()
    try:
        process.wait(timeout=8)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=8)


@pytest.fixture
def app_url(tmp_path, tiny_model):
    runs = tmp_path / "runs"
    runs.mkdir()
    port = _free_port()
    # The checkout's code, whatever an editable install elsewhere points at.
    command = [sys.executable, "-m", "pixart_tune.cli", "app", "--model", tiny_model, "--runs", str(runs), "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if k != "GRADIO_TEMP_DIR"}
    env.update(GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    log = tmp_path / "app.log"
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        # Built while the app starts: the page rescans the runs folder when it loads.
        make_adapter(tiny_model, runs / "style-a" / "final", seed=1)
        make_adapter(tiny_model, runs / "style-b" / "final", seed=2)
        url = f"http://127.0.0.1:{port}/"
        _wait_until_up(url, process, log)
        yield url, runs
    finally:
        _stop(process)
        print(f"app log: {log}")


def _pick(page, dropdown: str, option: str) -> None:
    """Adds ``option`` to a multiselect dropdown."""
    box = page.locator(f"{dropdown} input")
    box.click()
    # A click on a dropdown that still has the focus does not open it; the arrow key does.
    if box.get_attribute("aria-expanded") != "true":
        box.press("ArrowDown")
    page.get_by_role("option", name=option, exact=True).click()
    page.keyboard.press("Escape")


def _image(page, selector: str, previous: str | None = None) -> tuple[str, np.ndarray]:
    """(src, pixels) of the image shown in a gr.Image, once it differs from ``previous``."""
    img = page.locator(f"{selector} img")
    img.wait_for(timeout=60_000)
    if previous is not None:
        page.wait_for_function(
            "([sel, prev]) => { const i = document.querySelector(sel + ' img'); return i && i.src !== prev; }",
            arg=[selector, previous],
            timeout=60_000,
        )
    src = img.get_attribute("src")
    data = page.request.get(src).body()
    return src, np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)


def _screenshot(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / "screenshots" / f"{name}.png"
    path.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(path, ARTIFACTS / f"app-{name}.png")
    print(f"screenshot: {path}")


def test_preview_merge_and_preview_the_merge(app_url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, runs = app_url
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)

            # Side by side: base and adapted, same seed.
            _pick(page, "#adapters", "runs/style-a/final")
            page.get_by_label("number input for Scale: runs/style-a/final").wait_for()
            page.fill("#prompt textarea", "a red fox in the snow")
            steps = page.get_by_label("number input for Steps")
            steps.fill("8")
            steps.press("Enter")
            page.click("#generate")
            base_src, base = _image(page, "#base-image")
            # Even Gradio's copies of the previews stay inside the app's folders.
            assert str(runs / "merged" / ".gradio-cache") in base_src
            adapted_src, adapted = _image(page, "#adapted-image")
            assert base.shape == adapted.shape == (256, 256, 3)
            assert np.abs(base - adapted).mean() > 2.0, "the adapter did not change the image"
            expect(page.locator("#info")).to_contain_text("8 steps")
            expect(page.locator("#info")).to_contain_text("style-a/final x1")
            _screenshot(page, tmp_path, "generate")

            # A path outside the allowed folders is refused with a message.
            page.get_by_text("Add an adapter by path").click()
            page.fill("#add-path input, #add-path textarea", "/etc/passwd")
            page.click("#add-adapter")
            warning = page.locator(".toast-body", has_text="outside the folders this app may read")
            expect(warning).to_be_visible(timeout=20_000)
            warning.locator(".toast-close").click()

            # Merge both adapters by concatenation.
            page.get_by_role("tab", name="Merge").click()
            for name in ("runs/style-a/final", "runs/style-b/final"):
                _pick(page, "#merge-adapters", name)
                page.get_by_label(f"number input for Weight: {name}").wait_for()
            page.get_by_label("cat: concatenate (ranks add up, exact)").check()
            page.fill("#out-name input, #out-name textarea", "mix")
            page.click("#merge")
            expect(page.locator("#merge-result")).to_contain_text("Wrote a merged adapter", timeout=60_000)
            merged = runs / "merged" / "mix"
            assert (merged / "adapter_model.safetensors").is_file() and (merged / "adapter_config.json").is_file()
            _screenshot(page, tmp_path, "merge")
            # The same name again is refused with a message; nothing is overwritten.
            page.click("#merge")
            refusal = page.locator(".toast-body", has_text="already exists")
            expect(refusal).to_be_visible(timeout=20_000)
            refusal.locator(".toast-close").click()
            assert sorted(p.name for p in (runs / "merged").iterdir() if not p.name.startswith(".")) == ["mix"]

            # The merge is selected in the Generate tab: preview it at once.
            page.get_by_role("tab", name="Generate").click()
            page.get_by_label("number input for Scale: merged/mix").wait_for()
            expect(page.locator("#adapters")).not_to_contain_text("runs/style-a/final")
            page.click("#generate")
            _, merged_image = _image(page, "#adapted-image", previous=adapted_src)
            expect(page.locator("#info")).to_contain_text("merged/mix x1")
            assert np.abs(merged_image - adapted).mean() > 1.0, "the merged adapter looks like adapter a alone"
            assert np.abs(merged_image - base).mean() > 2.0, "the merged adapter did not change the image"
            _screenshot(page, tmp_path, "merged-preview")

            # A scale sweep of the merged adapter: one row, one column per scale.
            page.get_by_text("Scale sweep", exact=True).click()
            expect(page.locator("#swept input")).to_have_value("merged/mix")
            values = page.locator("#sweep-values textarea, #sweep-values input")
            # The accordion's fields have just mounted: wait for their first value, so
            # that the page does not reset the one typed next.
            expect(values).to_have_value("0, 0.5, 1, 1.5")
            values.fill("0, 1")
            values.press("Tab")
            expect(values).to_have_value("0, 1")
            page.click("#sweep")
            _, grid = _image(page, "#sweep-image")
            assert grid.shape[1] == 2 * 256
            assert np.abs(grid[-256:, :256] - base).mean() < 1.0  # scale 0 is the base model
            _screenshot(page, tmp_path, "sweep")
        finally:
            browser.close()
