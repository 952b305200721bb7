"""The Prompt grid tab in headless Chromium: two prompts x two seeds with an adapter, its PNG, its refusals, its API.

Starts the real app (``app_url``: the tiny model, runs/style-a/final and
runs/style-b/final). Screenshots at 1400 px and 390 px go under the test's
temporary folder (printed) and into tests/artifacts/.
"""

from __future__ import annotations

import io
import json
import re

from PIL import Image

from pixart_tune.app.grid import layout
from tests.browser_fixtures import BROWSER_MARKS, app_url, browser_page, pick, screenshot, shown_image, toast  # noqa: F401  (fixture)

pytestmark = BROWSER_MARKS

PROMPTS = ["a red fox in the snow", "a lighthouse on a cliff at dusk"]


def downloaded(page, selector: str) -> bytes:
    """The bytes behind the download link of a gr.File."""
    link = page.locator(f"{selector} a[href]").first
    link.wait_for(timeout=60_000)
    return page.request.get(link.get_attribute("href")).body()


def test_a_prompt_list_grid_downloads_with_its_parameters(app_url, tmp_path):
    from playwright.sync_api import expect

    url, runs = app_url
    with browser_page(url, 1400, 1000) as page:
        page.get_by_role("tab", name="Prompt grid").click()
        prompts = page.locator("#grid-prompts textarea")
        expect(prompts).not_to_have_value("")  # mounted with its example: what is typed next stays
        prompts.fill("\n".join(PROMPTS))
        seeds = page.locator("#grid-seeds textarea, #grid-seeds input")
        seeds.fill("0, 1")
        steps = page.locator("#grid-steps input[type=number]")
        steps.fill("12")
        steps.press("Enter")
        # The adapters were written after the app started: opening the tab found them.
        pick(page, "#grid-adapters", "runs/style-a/final")
        page.get_by_label("number input for Grid scale: runs/style-a/final").wait_for()

        page.click("#grid-generate")
        # Step-level progress on the image while it draws.
        expect(page.locator("#grid-image")).to_contain_text(re.compile(r"prompt [12]/2, seed [01]: step \d+/12"), timeout=60_000)
        _, grid = shown_image(page, "#grid-image")
        blank = Image.new("RGB", (256, 256))
        expected = layout([[blank] * 4] * 2, ["base", "style-a/final x1"], PROMPTS, [0, 1])
        assert grid.shape == (expected.height, expected.width, 3)
        expect(page.locator("#grid-info")).to_contain_text("Rows: base; style-a/final x1")

        png = Image.open(io.BytesIO(downloaded(page, "#grid-file")))
        parameters = json.loads(png.text["pixart-tune"])
        assert parameters["prompts"] == PROMPTS and parameters["seeds"] == [0, 1] and parameters["steps"] == 12
        assert parameters["adapters"] == [{"path": str((runs / "style-a" / "final").resolve()), "scale": 1.0}]
        assert png.size == (expected.width, expected.height)
        written = sorted((runs / "merged" / "grids").glob("grid-*.png"))
        assert len(written) == 1
        screenshot(page, tmp_path, "grid")

        # Refusals are one-line warnings; the grid shown stays.
        seeds.fill("-5")
        page.click("#grid-generate")
        toast(page, "whole numbers from 0 to")
        seeds.fill("0, 1, 2, 3, 4, 5, 6, 7")
        prompts.fill("\n".join(f"prompt {i}" for i in range(5)))
        page.click("#grid-generate")
        toast(page, "80 images")
        prompts.fill("  \n")
        page.click("#grid-generate")
        toast(page, "at least one prompt")
        expect(page.locator("#grid-image img")).to_be_visible()

        # On a phone the grid comes first, above the controls.
        page.set_viewport_size({"width": 390, "height": 844})
        image_box, button_box = page.locator("#grid-image").bounding_box(), page.locator("#grid-generate").bounding_box()
        assert image_box["y"] < button_box["y"]
        assert image_box["x"] >= 0 and image_box["x"] + image_box["width"] <= 390 + 1
        screenshot(page, tmp_path, "grid-phone")

    # The named endpoint: the same grid for a program, refusals as errors.
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(url, verbose=False, download_files=str(tmp_path / "api"))
    assert "/grid" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    path = client.predict(prompts=PROMPTS[0], seeds="4", adapters=[str(runs / "style-b" / "final")], scales=[0.5], steps=2, api_name="/grid")
    with Image.open(path) as png:
        parameters = json.loads(png.text["pixart-tune"])
    assert parameters["prompts"] == [PROMPTS[0]] and parameters["seeds"] == [4]
    assert parameters["rows"] == ["base", "style-b/final x0.5"]
    try:
        client.predict(prompts="a cat", adapters=["/etc/passwd"], scales=[1.0], api_name="/grid")
    except AppError as error:
        assert "may read" in str(error)
    else:
        raise AssertionError("an adapter outside the folders was accepted")
