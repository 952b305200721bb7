"""The Merge tab: merge adapters (or fuse them into the base model) and preview the result at once."""

from __future__ import annotations

import functools
from pathlib import Path

from pixart_tune.app.page import Page, shown, sliders_for
from pixart_tune.app.service import MERGE_METHODS, PreviewApp


def build(page: Page, app: PreviewApp) -> None:
    """The tab's widgets and listeners; registers the merge menu on ``page``."""
    import gradio as gr

    with gr.Tab("Merge", id="merge", elem_id="tab-merge"):
        with gr.Row():
            with gr.Column(scale=2, min_width=340):
                merge_adapters = gr.Dropdown(page.adapter_choices, value=[], multiselect=True, label="Adapters to merge", elem_id="merge-adapters",
                                             info="Each gets a weight slider")

                @gr.render(inputs=merge_adapters)
                def weight_sliders(selected):
                    selected = list(selected or [])
                    sliders = sliders_for(app, selected, "Weight")
                    # The menus are updated only after a merge succeeded, so a refused
                    # merge leaves them (and the user's selection) as they were.
                    merge_button.click(
                        shown("Merge", lambda: (gr.skip(), gr.skip(), ""))(lambda *v, progress=page.track(): _merge(app, selected, *v, progress=progress)),
                        inputs=[page.model, method, rank, out_name, *sliders],
                        outputs=[merge_result, merged_file, page.written],
                    ).success(functools.partial(_after_merge, app), inputs=[page.written, method, page.extra], outputs=[page.adapters, merge_adapters, page.model])

                method = gr.Radio([(text, key) for key, text in MERGE_METHODS.items()], value="linear", label="Method",
                                  elem_id="method", interactive=True)
                rank = gr.Number(8, precision=0, minimum=1, label="Rank (svd only)", elem_id="rank", interactive=True)
                out_name = gr.Textbox(label="Output name", placeholder="style-mix", elem_id="out-name", interactive=True,
                                      info=f"A new folder under {app.settings.outputs}")
                merge_button = gr.Button("Merge", variant="primary", elem_id="merge")
            with gr.Column(scale=3):
                merge_result = gr.Markdown("Merged adapters appear in the Generate tab's adapters; fused models in the base model menu.",
                                           elem_id="merge-result")
                merged_file = gr.File(label="Merged adapter weights", interactive=False, elem_id="merged-file")

    page.merge_adapters = merge_adapters


def _merge(app: PreviewApp, selected, model, method, rank, name, *weights, progress):
    from pixart_tune.base import ADAPTER_WEIGHTS

    out = app.merge(model, selected, weights, method, rank, name, progress)
    if method == "fuse":
        message = f"Wrote a fused model to `{out}`. It is now in the **Base model** menu: choose it there to preview it."
        return message, None, str(out)
    message = f"Wrote a merged adapter to `{out}`. It is selected in the **Generate** tab: press Generate there to preview it."
    weights_file = out / ADAPTER_WEIGHTS
    if method == "svd" and weights_file.is_file():
        message += f" The rank cut kept {_energy_kept(weights_file)} of the update's energy."
    return message, str(weights_file) if weights_file.is_file() else None, str(out)


def _energy_kept(weights_file: Path) -> str:
    """The fraction the merge stored in the file's header, as a percentage."""
    from safetensors import safe_open

    with safe_open(str(weights_file), framework="pt") as handle:
        value = (handle.metadata() or {}).get("energy_kept")
    try:
        return f"{float(value):.1%}"
    except (TypeError, ValueError):
        return "an unknown share"


def _after_merge(app: PreviewApp, out: str, method: str, current_extra):
    import gradio as gr

    if not out:  # the merge was refused: leave the menus as they are
        return gr.skip(), gr.skip(), gr.skip()

    choices = app.adapter_choices(current_extra)
    adapters = gr.Dropdown(choices=choices) if method == "fuse" else gr.Dropdown(choices=choices, value=[out])
    return adapters, gr.Dropdown(choices=choices), gr.Dropdown(choices=app.model_choices())
