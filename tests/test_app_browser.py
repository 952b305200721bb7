"""The real app in headless Chromium: preview an adapter, merge two, preview the merge.

Starts ``pixart-tune app`` as its own process on 127.0.0.1 with the tiny model and
two adapters with seeded random weights, and drives it through the page as a user
would. Screenshots are written under the test's temporary folder (printed) and
into tests/artifacts/.
"""

from __future__ import annotations

import re


import numpy as np

from tests.browser_fixtures import BROWSER_MARKS, app_url, browser_page, pick, screenshot, shown_image, toast  # noqa: F401  (fixture)

pytestmark = BROWSER_MARKS


def test_preview_merge_and_preview_the_merge(app_url, tmp_path):
    from playwright.sync_api import expect

    url, runs = app_url
    with browser_page(url, 1400, 1000) as page:

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
        warning = page.locator(".toast-body", has_text="not an adapter this app may read")
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


def _set(page, label: str, value: str) -> None:
    box = page.get_by_label(label)
    box.fill(value)
    box.press("Tab")


def test_progress_by_step_base_first_and_refusals_keep_the_images(app_url, tmp_path):
    """At 1400 px: step progress, the base image before the adapted one, app warnings (no 'Error') for bad values."""
    from playwright.sync_api import expect

    url, runs = app_url
    with browser_page(url, 1400, 1000) as page:
        pick(page, "#adapters", "runs/style-a/final")
        page.get_by_label("number input for Scale: runs/style-a/final").wait_for()
        _set(page, "number input for Steps", "100")
        page.click("#generate")
        # While the adapted image is drawn the base one is already shown, with the step count in the progress.
        expect(page.locator("#adapted-image").get_by_text("with adapters: step")).to_be_visible(timeout=60_000)
        assert page.locator("#base-image img").count() == 1
        _, base = shown_image(page, "#base-image")
        adapted_src, _ = shown_image(page, "#adapted-image")
        expect(page.locator("#info")).to_contain_text("100 steps")

        for seed, message in (("", "seed is empty"), ("99999999999999999999", "from 0 to 4294967295"), ("-5", "seed -5 is out of range")):
            page.fill("#seed input", seed)
            page.click("#generate")
            toast(page, message)
            assert page.locator(".toast-body", has_text="Error").count() == 0
            assert page.locator("#adapted-image img").get_attribute("src") == adapted_src  # nothing blanked
        page.fill("#seed input", "0")

        # The sweep: its result shows while it works, the grid wraps into rows of 4.
        page.get_by_text("Scale sweep", exact=True).click()
        values = page.locator("#sweep-values textarea, #sweep-values input")
        expect(values).to_have_value("0, 0.5, 1, 1.5")
        for text, message in (("1e9, 1", "out of range"), ("", "between 2 and 8"), ("big, small", "numbers separated")):
            values.fill(text)
            values.press("Tab")
            page.click("#sweep")
            toast(page, message)
        values.fill("0, 0.25, 0.5, 0.75, 1, 1.25")
        values.press("Tab")
        _set(page, "number input for Steps", "30")
        page.click("#sweep")
        # The sweep's own progress, by scale and step, shows on its (still empty) result.
        expect(page.locator("#sweep-image").get_by_text(re.compile(r"scale [\d.]+: step \d+/30"))).to_be_visible(timeout=60_000)
        _, grid = shown_image(page, "#sweep-image")
        assert grid.shape[1] == 4 * 256 and grid.shape[0] > 2 * 256
        screenshot(page, tmp_path, "sweep-rows")


def test_merge_by_default_exact_with_a_named_download_and_a_visible_rank_clamp(app_url, tmp_path):
    from playwright.sync_api import expect

    url, runs = app_url
    with browser_page(url, 1400, 1000) as page:
        page.get_by_role("tab", name="Merge").click()
        expect(page.get_by_label("cat: concatenate (ranks add up, exact)")).to_be_checked()
        for name in ("runs/style-a/final", "runs/style-b/final"):
            pick(page, "#merge-adapters", name)
            page.get_by_label(f"number input for Weight: {name}").wait_for()
        page.fill("#out-name input, #out-name textarea", "mix")
        page.click("#merge")
        expect(page.locator("#merge-result")).to_contain_text("Wrote a merged adapter", timeout=60_000)
        # Gradio shows the name and its extension apart; the link is the file itself.
        expect(page.locator("#merged-file a")).to_have_attribute("href", re.compile(r"/mix\.safetensors$"))
        page.get_by_label("svd: exact sum cut to a rank by SVD").check()
        for rank, message in (("0", "svd rank 0 is out of range"), ("", "svd rank is empty")):
            page.fill("#rank input", rank)
            page.click("#merge")
            toast(page, message)
        page.fill("#rank input", "1000000")
        page.fill("#out-name input, #out-name textarea", "big")
        page.click("#merge")
        expect(page.locator("#merge-result")).to_contain_text("above the adapters' combined rank 8: using 8", timeout=60_000)
        expect(page.locator("#merge-result")).to_contain_text("kept 100.0%")
        expect(page.locator("#merged-file a")).to_have_attribute("href", re.compile(r"/big\.safetensors$"))


def test_phone_layout_shows_the_result_first_and_cuts_nothing(app_url, tmp_path):
    url, runs = app_url
    with browser_page(url, 390, 844) as page:
        page.locator("#bucket input").wait_for()
        assert page.locator("#base-image").bounding_box()["y"] < page.locator("#adapters").bounding_box()["y"]
        size = page.locator("#bucket input")
        assert size.evaluate("e => e.scrollWidth <= e.clientWidth"), size.input_value()
        label = page.locator("#guidance [data-testid='block-info']")
        assert label.evaluate("e => e.getBoundingClientRect().height") < 30, "the Guidance label wraps"  # one line of text
        screenshot(page, tmp_path, "phone-390")


def test_named_api_endpoints_upload_limits_and_the_empty_runs_note(app_url):
    import json
    import urllib.error
    import urllib.request

    url, runs = app_url
    with urllib.request.urlopen(url + "gradio_api/info", timeout=30) as response:
        info = json.load(response)
    named = set(info["named_endpoints"])
    assert {"/generate", "/sweep", "/merge"} <= named, named
    assert not any(word in name for name in named for word in ("lambda", "rescan", "add_adapter", "render", "change", "after")), named
    assert not info["unnamed_endpoints"]

    def upload(size: int, origin: str | None) -> int:
        body = b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"x.bin\"\r\n\r\n" + b"0" * size + b"\r\n--b--\r\n"
        headers = {"Content-Type": "multipart/form-data; boundary=b", **({"Origin": origin} if origin else {})}
        request = urllib.request.Request(url + "gradio_api/upload", data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    assert upload(10, url.rstrip("/")) == 200
    assert upload(10, "https://elsewhere.example") == 403
    assert upload(6 * 1024 * 1024, None) in (413, 400)
