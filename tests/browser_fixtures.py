"""The browser harness of the app's tests: the real ``pixart-tune app`` in its own process, driven by headless Chromium.

Import what a test module needs (``from tests.browser_fixtures import ...``); the
``app_url`` fixture starts the app on the tiny model with two adapters under its
runs folder. No browser is downloaded: the system Chromium is used, and tests
are skipped without it (``pytestmark``).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from tests.test_app import make_adapter

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]

BROWSER_MARKS = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="no system Chromium (apt-get install chromium); no browser is downloaded"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
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


def stop_app(process: subprocess.Popen) -> None:
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
    url, process, log = start_app(tmp_path, tiny_model, runs)
    try:
        # Built while the app starts: the page rescans the runs folder when it loads.
        make_adapter(tiny_model, runs / "style-a" / "final", seed=1)
        make_adapter(tiny_model, runs / "style-b" / "final", seed=2)
        wait_until_up(url, process, log)
        yield url, runs
    finally:
        stop_app(process)
        print(f"app log: {log}")


def pick(page, dropdown: str, option: str) -> None:
    """Adds ``option`` to a multiselect dropdown."""
    box = page.locator(f"{dropdown} input")
    box.click()
    # A click on a dropdown that still has the focus does not open it; the arrow key does.
    if box.get_attribute("aria-expanded") != "true":
        box.press("ArrowDown")
    page.get_by_role("option", name=option, exact=True).click()
    page.keyboard.press("Escape")


def shown_image(page, selector: str, previous: str | None = None) -> tuple[str, np.ndarray]:
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


def screenshot(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / "screenshots" / f"{name}.png"
    path.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(path, ARTIFACTS / f"app-{name}.png")
    print(f"screenshot: {path}")


def start_app(tmp_path: Path, model: str, runs: Path):
    """``pixart-tune app`` on ``model`` and ``runs`` in its own process: (url, process, log); stop it with :func:`stop_app`."""
    port = free_port()
    # The checkout's code, whatever an editable install elsewhere points at.
    command = [sys.executable, "-m", "pixart_tune.cli", "app", "--model", model, "--runs", str(runs), "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if k != "GRADIO_TEMP_DIR"}
    env.update(GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    log = tmp_path / "app.log"
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    return f"http://127.0.0.1:{port}/", process, log


@pytest.fixture
def runs_app_url(tmp_path, tiny_model, trained_run):
    """The app with a runs folder holding a real training run (``trained_run`` of tests/test_app_runs.py) as ``red-style``."""
    runs = tmp_path / "runs"
    shutil.copytree(trained_run, runs / trained_run.name)
    url, process, log = start_app(tmp_path, tiny_model, runs)
    try:
        wait_until_up(url, process, log)
        yield url, runs / trained_run.name
    finally:
        stop_app(process)
        print(f"app log: {log}")


@contextlib.contextmanager
def browser_page(url: str | None, width: int = 1400, height: int = 1000) -> Iterator:
    """A page of headless Chromium at ``width`` x ``height``, opened at ``url`` (None: blank)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            if url is not None:
                page.goto(url)
            yield page
        finally:
            browser.close()


def toast(page, text: str) -> None:
    """Waits for the warning toast holding ``text``, closes it, and waits until it is gone."""
    from playwright.sync_api import expect

    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    toast = page.locator(".toast-body", has_text=text)
    expect(toast.first).to_be_visible(timeout=30_000)
    try:
        toast.first.locator(".toast-close").click(timeout=3_000)
    except PlaywrightTimeout:
        pass  # already leaving: a warning closes itself after a few seconds
    # Gone before the next check, so a later toast of the same words is a new one.
    expect(toast).to_have_count(0, timeout=20_000)
