"""The Prompt grid tab: a list of prompts x seeds for the base model and adapters, as one downloadable PNG.

The work is :func:`pixart_tune.app.grid.prompt_grid`; the page's button and the
named API endpoint ``grid`` both call it. The endpoint is declared with
``gr.api`` from typed arguments (adapters and their scales as two lists), since
the page's scale sliders exist only inside a render function. (No postponed
annotations here: Gradio reads that endpoint's type hints, ``gr.FileData`` included.)
"""

import logging
from typing import Sequence

from pixart_tune.app.grid import MAX_IMAGES, MAX_PROMPTS, MAX_SEEDS, prompt_grid
from pixart_tune.app.page import Page, shown, sliders_for
from pixart_tune.app.service import PreviewApp, bucket_choices, square_bucket
from pixart_tune.errors import UserError

log = logging.getLogger(__name__)

EXAMPLE_PROMPTS = "a photo of a cat\na watercolor landscape with mountains"


def build(page: Page, app: PreviewApp) -> None:
    """The tab's widgets and listeners, and the ``grid`` API endpoint."""
    import gradio as gr

    with gr.Tab("Prompt grid", id="grid", elem_id="tab-grid") as tab:
        # results-first: on a phone the grid comes above the controls (ui.CSS).
        with gr.Row(elem_classes="results-first"):
            with gr.Column(scale=2, min_width=340):
                prompts = gr.Textbox(EXAMPLE_PROMPTS, label="Prompts, one a line", lines=4, max_lines=16, elem_id="grid-prompts",
                                     info=f"At most {MAX_PROMPTS}; lines starting with # are skipped", interactive=True)
                negative = gr.Textbox(label="Negative prompt", elem_id="grid-negative", interactive=True)
                adapters = gr.Dropdown(page.adapter_choices, value=[], multiselect=True, label="Adapters", elem_id="grid-adapters",
                                       info="One row with all of them together; each gets a scale slider")

                @gr.render(inputs=adapters)
                def scale_sliders(selected):
                    selected = list(selected or [])
                    sliders = sliders_for(app, selected, "Grid scale")
                    generate.click(
                        shown("Prompt grid", lambda: (gr.skip(),) * 3)(
                            lambda *v, progress=gr.Progress(): _draw(app, selected, *v, progress=progress)
                        ),
                        inputs=[page.model, prompts, negative, seeds, steps, guidance, bucket, base, each_alone, *sliders],
                        outputs=[image, file, info],
                        show_progress_on=[image],
                        api_visibility="private",  # the endpoint is `grid`, below
                    )

                with gr.Row():
                    base = gr.Checkbox(True, label="Include the base model", elem_id="grid-base", interactive=True)
                    each_alone = gr.Checkbox(False, label="Each adapter alone too", elem_id="grid-each-alone", interactive=True)
                with gr.Row():
                    seeds = gr.Textbox("0, 1", label="Seeds", elem_id="grid-seeds", interactive=True,
                                       info=f"Whole numbers, separated by commas; at most {MAX_SEEDS}")
                    bucket = gr.Dropdown(bucket_choices(page.buckets), value=square_bucket(page.buckets), label="Size (width × height)",
                                         elem_id="grid-bucket", interactive=True)
                with gr.Row():
                    steps = gr.Slider(1, 100, value=20, step=1, label="Steps", elem_id="grid-steps", interactive=True)
                    guidance = gr.Slider(1.0, 15.0, value=4.5, step=0.5, label="Guidance", elem_id="grid-guidance", interactive=True)
                generate = gr.Button("Generate grid", variant="primary", elem_id="grid-generate")
            with gr.Column(scale=3):
                image = gr.Image(label="Prompt grid", type="filepath", format="png", interactive=False, elem_id="grid-image")
                info = gr.Markdown(
                    f"Rows: the base model, each adapter alone if asked, all adapters together; a block of seeds per prompt. "
                    f"At most {MAX_IMAGES} images in one grid.",
                    elem_id="grid-info",
                )
                file = gr.File(label="Grid PNG, with its parameters", interactive=False, elem_id="grid-file")

    def refresh(current_extra):
        """The adapters as they are now: trained, merged or added by path since the page loaded.

        Only the choices: the selection is the browser's, which may have changed while this ran.
        """
        return gr.Dropdown(choices=app.adapter_choices(current_extra))

    for trigger in (tab.select, page.rescan.click):  # opening the tab, or the page's "Rescan folders"
        trigger(refresh, page.extra, adapters, api_visibility="private", show_progress="hidden")

    def follow_model(name, current):
        # The page loads the model (ui.change_model, with its warning if it cannot); this only follows its sizes.
        try:
            with app.holder.lock:
                buckets = app.holder.get(app.check_model(name)).buckets()
        except Exception:
            return gr.skip()
        values = {f"{h}x{w}" for h, w in buckets}
        return gr.Dropdown(choices=bucket_choices(buckets), value=current if current in values else square_bucket(buckets))

    page.model.change(follow_model, [page.model, bucket], bucket, api_visibility="private", show_progress="hidden")

    def grid(
        prompts: str,
        seeds: str = "0",
        adapters: list[str] | None = None,
        scales: list[float] | None = None,
        steps: int = 20,
        guidance: float = 4.5,
        size: str = "",
        include_base: bool = True,
        each_alone: bool = False,
        negative_prompt: str = "",
        model: str = "",
    ) -> gr.FileData:
        """A grid of prompts (one a line) x seeds (comma-separated) for the base model and the adapters (paths, one scale each).

        Returns the PNG, with every parameter in its text chunks. ``size`` is HEIGHTxWIDTH
        (default: the model's square size); ``model`` defaults to the first startup model.
        """
        try:
            drawn = prompt_grid(
                app, model or app.settings.models[0], prompts, seeds, adapters or [], scales or [], negative=negative_prompt,
                steps=steps, guidance=guidance, bucket=size, base=include_base, each_alone=each_alone,
            )
        except UserError as error:
            log.info("grid refused: %s", error)
            raise gr.Error(str(error), title="Prompt grid: refused", print_exception=False) from None
        except Exception as error:
            log.exception("grid failed")
            raise gr.Error(f"{type(error).__name__}: {error} (details in the app's console)", print_exception=False) from None
        return gr.FileData(path=str(drawn.path), orig_name=drawn.path.name, mime_type="image/png")

    # Declared once the tabs are closed: inside gr.Tabs only gr.Tab may stand.
    page.after_build.append(lambda: gr.api(grid, api_name="grid"))


def _draw(app: PreviewApp, selected: Sequence[str], model, prompts, negative, seeds, steps, guidance, bucket, base, each_alone, *scales, progress):
    drawn = prompt_grid(
        app, model, prompts, seeds, list(selected), list(scales), negative=negative, steps=steps, guidance=guidance,
        bucket=bucket, base=base, each_alone=each_alone, progress=progress,
    )
    p = drawn.parameters
    rows = "; ".join(p["rows"])
    text = (
        f"{len(p['prompts'])} prompts x seeds {', '.join(map(str, p['seeds']))}, {p['steps']} steps, guidance {p['guidance']:g}, "
        f"{p['width']} × {p['height']}. Rows: {rows}. Saved as `{drawn.path.name}` in the outputs folder."
    )
    return str(drawn.path), str(drawn.path), text
