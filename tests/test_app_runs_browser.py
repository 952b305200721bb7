"""The Runs tab in headless Chromium, on a real tiny training run: curves, grids over steps, a checkpoint into Generate.

The run (``trained_run``) trains in a few seconds with validation grids, held-out
losses and checkpoints every 2 of its 6 steps. Screenshots at 1400 px and 390 px
go under the test's temporary folder (printed) and into tests/artifacts/.
"""

from __future__ import annotations

import numpy as np

from tests.browser_fixtures import (  # noqa: F401  (fixture)
    BROWSER_MARKS,
    browser_page,
    pick,
    runs_app_url,
    screenshot,
    shown_image,
)
from tests.test_app_runs import trained_run  # noqa: F401  (fixture)
from tests.training_fixtures import red_dataset  # noqa: F401  (fixture)

pytestmark = BROWSER_MARKS


def open_run(page, url: str, name: str) -> None:
    page.goto(url)
    page.get_by_role("tab", name="Runs").click()
    pick(page, "#run", name)
    page.locator("#run-summary").get_by_text(name).wait_for(timeout=30_000)


def assert_inside(inner, outer) -> None:
    """``inner`` lies within ``outer`` on the page: shown, not cut off by it."""
    a, b = inner.bounding_box(), outer.bounding_box()
    assert b["x"] <= a["x"] and a["x"] + a["width"] <= b["x"] + b["width"] + 1, (a, b)
    assert b["y"] <= a["y"] and a["y"] + a["height"] <= b["y"] + b["height"] + 1, (a, b)


def test_a_run_in_pictures_and_a_checkpoint_previewed(runs_app_url, tmp_path):  # noqa: F811
    from playwright.sync_api import expect

    url, _ = runs_app_url
    with browser_page(None, 1400, 1000) as page:
        open_run(page, url, "red-style")
        expect(page.locator("#run-summary")).to_contain_text("last step 6 · 3 validation grids · 2 checkpoints and the final adapter")
        expect(page.locator("#run-lowest")).to_contain_text("Lowest held-out loss")

        # Both series in one plot, named in its legend.
        legend = page.locator("#run-loss svg")
        expect(legend.get_by_text("training loss", exact=True)).to_be_visible(timeout=30_000)
        expect(legend.get_by_text("held-out loss", exact=True)).to_be_visible()
        assert_inside(legend.get_by_text("held-out loss", exact=True), page.locator("#run-loss"))

        # The config as the run wrote it.
        page.locator("#run-config-box").get_by_text("Config (config.yaml").click()
        expect(page.locator("#run-config")).to_contain_text("eval_fraction: 0.5")

        # The grid of the last step, the base grid beside it; the slider goes back to step 2.
        last_src, last = shown_image(page, "#run-grid")
        _, base = shown_image(page, "#run-base-grid")
        assert last.shape == base.shape
        expect(page.locator("#run-grid")).to_contain_text("step 6")
        step = page.locator("#run-grid-step input[type=number]")
        step.fill("2")
        step.press("Enter")
        _, first = shown_image(page, "#run-grid", previous=last_src)
        expect(page.locator("#run-grid")).to_contain_text("step 2")
        assert np.abs(first - last).mean() > 0.5, "the slider left the grid as it was"
        screenshot(page, tmp_path, "runs-1400")

        # A checkpoint into the Generate tab, then a Generate with it.
        pick(page, "#run-checkpoint", "step 4")
        page.click("#preview-checkpoint")
        expect(page.get_by_role("tab", name="Generate")).to_have_attribute("aria-selected", "true")
        expect(page.locator("#adapters")).to_contain_text("step")
        scale = page.get_by_label("number input for Scale:", exact=False)
        expect(scale).to_have_count(1)
        steps = page.get_by_label("number input for Steps")
        steps.fill("4")
        steps.press("Enter")
        page.click("#generate")
        _, base_image = shown_image(page, "#base-image")
        _, adapted_image = shown_image(page, "#adapted-image")
        assert np.abs(adapted_image - base_image).mean() > 0.5, "the checkpoint left the image as the base model draws it"

        phone = page.context.browser.new_page(viewport={"width": 390, "height": 844})
        open_run(phone, url, "red-style")
        shown_image(phone, "#run-grid")
        expect(phone.locator("#run-loss svg").get_by_text("held-out loss", exact=True)).to_be_visible(timeout=30_000)
        assert_inside(phone.locator("#run-loss svg").get_by_text("held-out loss", exact=True), phone.locator("#run-loss"))
        screenshot(phone, tmp_path, "runs-390")
