"""The real app in headless Chromium: preview an adapter, merge two, preview the merge.

Starts ``pixart-tune app`` as its own process on 127.0.0.1 with the tiny model and
two adapters with seeded random weights, and drives it through the page as a user
would. Screenshots are written under the test's temporary folder (printed) and
into tests/artifacts/.
"""

from __future__ import annotations


import numpy as np

from tests.browser_fixtures import BROWSER_ARGS, BROWSER_MARKS, CHROMIUM, shown_image, pick, screenshot, app_url  # noqa: F401  (fixture)

pytestmark = BROWSER_MARKS


def test_preview_merge_and_preview_the_merge(app_url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, runs = app_url
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)

            # Side by side: base and adapted, same seed.
            pick(page, "#adapters", "runs/style-a/final")
            page.get_by_label("number input for Scale: runs/style-a/final").wait_for()
            page.fill("#prompt textarea", "a red fox in the snow")
            steps = page.get_by_label("number input for Steps")
            steps.fill("8")
            steps.press("Enter")
            page.click("#generate")
            base_src, base = shown_image(page, "#base-image")
            # Even Gradio's copies of the previews stay inside the app's folders.
            assert str(runs / "merged" / ".gradio-cache") in base_src
            adapted_src, adapted = shown_image(page, "#adapted-image")
            assert base.shape == adapted.shape == (256, 256, 3)
            assert np.abs(base - adapted).mean() > 2.0, "the adapter did not change the image"
            expect(page.locator("#info")).to_contain_text("8 steps")
            expect(page.locator("#info")).to_contain_text("style-a/final x1")
            screenshot(page, tmp_path, "generate")

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
                pick(page, "#merge-adapters", name)
                page.get_by_label(f"number input for Weight: {name}").wait_for()
            page.get_by_label("cat: concatenate (ranks add up, exact)").check()
            page.fill("#out-name input, #out-name textarea", "mix")
            page.click("#merge")
            expect(page.locator("#merge-result")).to_contain_text("Wrote a merged adapter", timeout=60_000)
            merged = runs / "merged" / "mix"
            assert (merged / "adapter_model.safetensors").is_file() and (merged / "adapter_config.json").is_file()
            screenshot(page, tmp_path, "merge")
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
            _, merged_image = shown_image(page, "#adapted-image", previous=adapted_src)
            expect(page.locator("#info")).to_contain_text("merged/mix x1")
            assert np.abs(merged_image - adapted).mean() > 1.0, "the merged adapter looks like adapter a alone"
            assert np.abs(merged_image - base).mean() > 2.0, "the merged adapter did not change the image"
            screenshot(page, tmp_path, "merged-preview")

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
            _, grid = shown_image(page, "#sweep-image")
            assert grid.shape[1] == 2 * 256
            assert np.abs(grid[-256:, :256] - base).mean() < 1.0  # scale 0 is the base model
            screenshot(page, tmp_path, "sweep")
        finally:
            browser.close()
