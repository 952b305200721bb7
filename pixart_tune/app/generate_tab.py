"""The Generate tab: the base model and the adapted one side by side with one seed, and a scale sweep."""

from __future__ import annotations

from pathlib import Path

from pixart_tune.app.files import unique
from pixart_tune.app.page import Page, follow_sliders, shown, sliders_for, values_for
from pixart_tune.app.service import GUIDANCE, MAX_SEED, STEPS, PreviewApp, bucket_choices, square_bucket


def build(page: Page, app: PreviewApp) -> None:
    """The tab's widgets and listeners; registers the adapters menu on ``page``."""
    import gradio as gr

    with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
        # results-first: on a phone the images come above the controls (ui.CSS).
        with gr.Row(elem_classes="results-first"):
            with gr.Column(scale=2, min_width=340, elem_classes="controls"):
                adapters = gr.Dropdown(page.adapter_choices, value=[], multiselect=True, label="Adapters", elem_id="adapters",
                                       info="Found in the runs and outputs folders; each gets a scale slider")

                scale_values = gr.JSON({}, visible=False, label="Scales (adapter path: scale, 1 when not given)")

                @gr.render(inputs=adapters)
                def scale_sliders(selected):
                    selected = list(selected or [])
                    follow_sliders(sliders_for(app, selected, "Scale"), selected, scale_values)

                with gr.Accordion("Add an adapter by path", open=False):
                    add_path = gr.Textbox(label="Adapter folder or .safetensors file", elem_id="add-path",
                                          placeholder="runs/my-style/final (under the allowed folders)")
                    add_button = gr.Button("Add", size="sm", elem_id="add-adapter")
                prompt = gr.Textbox("a photo of a cat", label="Prompt", lines=2, elem_id="prompt", interactive=True)
                negative = gr.Textbox(label="Negative prompt", elem_id="negative", interactive=True)
                with gr.Row():
                    # No minimum/maximum on the number: Gradio's own check would answer a bare "Error"; the action says the range.
                    seed = gr.Number(0, precision=0, label="Seed", elem_id="seed", interactive=True, min_width=120,
                                     info=f"0 to {MAX_SEED}")
                    bucket = gr.Dropdown(bucket_choices(page.buckets), value=square_bucket(page.buckets), label="Size (width × height)",
                                         elem_id="bucket", interactive=True, min_width=220)
                with gr.Row():
                    steps = gr.Slider(*STEPS, value=20, step=1, label="Steps", elem_id="steps", interactive=True, min_width=220)
                    guidance = gr.Slider(*GUIDANCE, value=4.5, step=0.5, label="Guidance", elem_id="guidance", interactive=True, min_width=220)
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Accordion("Scale sweep", open=False):
                    swept = gr.Dropdown([], label="Adapter to sweep", elem_id="swept", interactive=True)
                    sweep_values = gr.Textbox("0, 0.5, 1, 1.5", label="Scales", elem_id="sweep-values", interactive=True,
                                              info="2 to 8 numbers from -2 to 2, separated by commas")
                    sweep_button = gr.Button("Sweep", elem_id="sweep")
            with gr.Column(scale=3, elem_classes="results"):
                with gr.Row():
                    base_image = gr.Image(label="Base model", type="pil", format="png", interactive=False, elem_id="base-image")
                    adapted_image = gr.Image(label="With adapters", type="pil", format="png", interactive=False, elem_id="adapted-image")
                info = gr.Markdown("Same seed on both sides: the difference is the adapters.", elem_id="info")
                sweep_image = gr.Image(label="Scale sweep", type="pil", format="png", interactive=False, visible=False, elem_id="sweep-image")

    page.adapters, page.bucket, page.swept = adapters, bucket, swept

    def compare(model, prompt, negative, seed, steps, guidance, bucket, selected, scales, progress=page.track()):
        yield from _compare(app, selected, model, prompt, negative, seed, steps, guidance, bucket, *values_for(selected, scales), progress=progress)

    def sweep(model, prompt, negative, seed, steps, guidance, bucket, selected, scales, swept, values, progress=page.track()):
        yield from _sweep(app, selected, model, prompt, negative, seed, steps, guidance, bucket, swept, values, *values_for(selected, scales), progress=progress)

    # The widgets that ran are set to the values used, so the page never shows one value and runs another.
    generate.click(
        shown("Generate", lambda: (gr.skip(),) * 5)(compare),
        inputs=[page.model, prompt, negative, seed, steps, guidance, bucket, adapters, scale_values],
        outputs=[base_image, adapted_image, info, steps, guidance],
        show_progress_on=[base_image, adapted_image], api_name="generate",
    )
    sweep_button.click(
        shown("Scale sweep", gr.skip)(sweep),
        inputs=[page.model, prompt, negative, seed, steps, guidance, bucket, adapters, scale_values, swept, sweep_values],
        outputs=[sweep_image], show_progress_on=[sweep_image], api_name="sweep",
    )

    @shown("Add an adapter", lambda: (gr.skip(),) * 4)
    def add_adapter(path, selected, current_extra):
        resolved = str(app.check_adapter(path))
        current_extra = [str(p) for p in unique([*map(Path, current_extra), Path(resolved)])]
        choices = app.adapter_choices(current_extra)
        return (
            gr.Dropdown(choices=choices, value=[*dict.fromkeys([*(selected or []), resolved])]),
            gr.Dropdown(choices=choices),
            current_extra,
            "",
        )

    # The Merge tab is built after this one: its menu exists once the page is done.
    def add_listeners() -> None:
        for trigger in (add_button.click, add_path.submit):
            trigger(add_adapter, [add_path, adapters, page.extra], [adapters, page.merge_adapters, page.extra, add_path], api_visibility="private")

    page.after_build.append(add_listeners)
    adapters.change(
        lambda selected, current: gr.Dropdown(
            choices=[(app.label(p), p) for p in selected or []],
            value=current if current in (selected or []) else next(iter(selected or []), None),
        ),
        [adapters, swept],
        swept,
        api_visibility="private",
    )


def _compare(app: PreviewApp, selected, model, prompt, negative, seed, steps, guidance, bucket, *scales, progress):
    """Yields the base image as soon as it is drawn, then both with the caption and the values used."""
    import gradio as gr

    keep = (gr.skip(),) * 2
    for base, adapted in app.compare_steps(model, prompt, negative, seed, steps, guidance, bucket, selected, scales, progress):
        if adapted is None and selected:
            yield base, None, "Base model drawn; drawing the adapted image ...", *keep
    if adapted is None:
        gr.Warning("No adapter selected: showing the base model only. Pick adapters to compare.")
    parts = ", ".join(f"{app.label(p)} x{float(s):g}" for p, s in zip(selected, scales)) or "none"
    height, _, width = str(bucket).partition("x")
    text = f"Seed {int(seed)}, {int(steps)} steps, guidance {float(guidance):g}, {width} × {height}. Adapters: {parts}."
    yield base, adapted, text, int(steps), float(guidance)


def _sweep(app: PreviewApp, selected, model, prompt, negative, seed, steps, guidance, bucket, swept, values, *scales, progress):
    """Shows the (empty) result first, so its progress is visible while the grid is drawn."""
    import gradio as gr

    from pixart_tune.app.service import check_inputs, parse_scales

    parse_scales(values), check_inputs(seed, steps, guidance, scales)  # a refusal before the result is shown
    yield gr.Image(value=None, visible=True)
    grid = app.sweep(model, prompt, negative, seed, steps, guidance, bucket, selected, scales, swept, values, progress)
    yield gr.Image(value=grid, visible=True)
