"""The Merge tab: merge adapters (or fuse them into the base model) and preview the result at once."""

from __future__ import annotations

import functools
from pathlib import Path

from pixart_tune.app.page import Page, follow_sliders, shown, sliders_for, values_for
from pixart_tune.app.service import DEFAULT_METHOD, MERGE_METHODS, PreviewApp


def build(page: Page, app: PreviewApp) -> None:
    """The tab's widgets and listeners; registers the merge menu on ``page``."""
    import gradio as gr

    with gr.Tab("Merge", id="merge", elem_id="tab-merge"):
        with gr.Row(elem_classes="results-first"):
            with gr.Column(scale=2, min_width=340, elem_classes="controls"):
                merge_adapters = gr.Dropdown(page.adapter_choices, value=[], multiselect=True, label="Adapters to merge", elem_id="merge-adapters",
                                             info="Each gets a weight slider")

                weight_values = gr.JSON({}, visible=False, label="Weights (adapter path: weight, 1 when not given)")

                @gr.render(inputs=merge_adapters)
                def weight_sliders(selected):
                    selected = list(selected or [])
                    follow_sliders(sliders_for(app, selected, "Weight"), selected, weight_values)

                method = gr.Radio([(text, key) for key, text in MERGE_METHODS.items()], value=DEFAULT_METHOD, label="Method",
                                  elem_id="method", interactive=True)
                rank = gr.Number(8, precision=0, label="Rank (svd only)", elem_id="rank", interactive=True,
                                 info="At least 1; above the adapters' combined rank, their combined rank is used")
                out_name = gr.Textbox(label="Output name", placeholder="style-mix", elem_id="out-name", interactive=True,
                                      info=f"A new folder under {app.settings.outputs}")
                merge_button = gr.Button("Merge", variant="primary", elem_id="merge")
            with gr.Column(scale=3, elem_classes="results"):
                merge_result = gr.Markdown("Merged adapters appear in the Generate tab's adapters; fused models in the base model menu.",
                                           elem_id="merge-result")
                merged_file = gr.File(label="Merged adapter weights", interactive=False, elem_id="merged-file")

    page.merge_adapters = merge_adapters

    def merge(model, method, rank, name, selected, weights, progress=page.track()):
        return _merge(app, selected, model, method, rank, name, *values_for(selected, weights), progress=progress)

    # The menus are updated only after a merge succeeded, so a refused
    # merge leaves them (and the user's selection) as they were.
    merge_button.click(
        shown("Merge", lambda: (gr.skip(), gr.skip(), ""))(merge),
        inputs=[page.model, method, rank, out_name, merge_adapters, weight_values],
        outputs=[merge_result, merged_file, page.written], api_name="merge",
    ).success(functools.partial(_after_merge, app), inputs=[page.written, method, page.extra], outputs=[page.adapters, merge_adapters, page.model],
              api_visibility="private")


def _merge(app: PreviewApp, selected, model, method, rank, name, *weights, progress):
    out, notes = app.merge_noted(model, selected, weights, method, rank, name, progress)
    said = "".join(f" Note: {note}." for note in notes)
    if method == "fuse":
        message = f"Wrote a fused model to `{out}`. It is now in the **Base model** menu: choose it there to preview it.{said}"
        return message, None, str(out)
    message = f"Wrote a merged adapter to `{out}`. It is selected in the **Generate** tab: press Generate there to preview it.{said}"
    download = app.download(out)
    if method == "svd" and download is not None:
        message += f" The rank cut kept {_energy_kept(download)} of the update's energy."
    return message, str(download) if download else None, str(out)


def _energy_kept(weights_file: Path) -> str:
    """The fraction the merge stored in the file's header, as a percentage; never rounded up to 100% when something was cut."""
    from safetensors import safe_open

    with safe_open(str(weights_file), framework="pt") as handle:
        value = (handle.metadata() or {}).get("energy_kept")
    try:
        kept = float(value)
    except (TypeError, ValueError):
        return "an unknown share"
    text = f"{kept:.1%}"
    return "over 99.9%" if kept < 1.0 and text == "100.0%" else text


def _after_merge(app: PreviewApp, out: str, method: str, current_extra):
    import gradio as gr

    if not out:  # the merge was refused: leave the menus as they are
        return gr.skip(), gr.skip(), gr.skip()

    choices = app.adapter_choices(current_extra)
    adapters = gr.Dropdown(choices=choices) if method == "fuse" else gr.Dropdown(choices=choices, value=[out])
    return adapters, gr.Dropdown(choices=choices), gr.Dropdown(choices=app.model_choices())
