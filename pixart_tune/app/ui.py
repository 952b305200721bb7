"""The Gradio page: a Generate tab (base and adapted side by side, scale sweep) and a Merge tab.

The widgets only collect values and show results; :class:`PreviewApp` does the
work and checks every value again. Per-adapter sliders are drawn with
``@gr.render`` from the selected adapters, so the listeners that read them are
declared inside the render functions, as Gradio requires.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any, Callable

from pixart_tune.app.files import unique
from pixart_tune.app.service import MERGE_METHODS, AppSettings, PreviewApp, bucket_choices, square_bucket
from pixart_tune.errors import UserError

log = logging.getLogger(__name__)

TITLE = "pixart-tune: preview and merge adapters"


def shown(action: str, refused: Callable[[], Any]) -> Callable:
    """Turns errors into messages on the page, never tracebacks.

    A UserError (bad input) becomes a warning and the outputs ``refused()`` gives,
    usually "leave as they were": an error would mark every output failed. Other
    exceptions are real failures: an error message, with the traceback in the
    app's console.
    """
    import gradio as gr

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except gr.Error as error:  # a message for the page, not a failure: no traceback on the console
                error.print_exception = False
                raise
            except UserError as error:
                gr.Warning(str(error), title=f"{action}: refused")
                return refused()
            except Exception as error:
                log.exception("%s failed", action)
                raise gr.Error(f"{type(error).__name__}: {error} (details in the app's console)", title=f"{action}: failed", print_exception=False) from None

        return wrapper

    return decorate


def build_app(settings: AppSettings, app: PreviewApp | None = None):
    """The Gradio Blocks page. The first model is loaded here, so its sizes can be offered."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    # Gradio writes every image it shows into its cache: keep that inside the outputs
    # folder too (hidden, so adapter discovery skips it) rather than in /tmp.
    settings.outputs.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("GRADIO_TEMP_DIR", str(settings.outputs / ".gradio-cache"))
    import gradio as gr

    app = app or PreviewApp(settings)
    buckets = app.holder.get(app.check_model(settings.models[0])).buckets()
    adapter_choices = app.adapter_choices()
    track = functools.partial(gr.Progress, track_tqdm=True)

    # delete_cache: every hour, drop cached previews older than a day.
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        extra = gr.State([])  # adapters this browser tab added by path
        written = gr.State("")  # the last merge output, for the menus to pick it up
        gr.Markdown(
            f"## {TITLE}\nAdapters are read from `{settings.runs}`; merges and fused models are written to "
            f"`{settings.outputs}`. The app touches no file outside its folders."
        )
        with gr.Row():
            model = gr.Dropdown(app.model_choices(), value=settings.models[0], label="Base model", allow_custom_value=True, scale=5,
                                elem_id="model", info="A startup model, a fused model from the outputs folder, or a pipeline folder under the allowed folders")
            rescan = gr.Button("Rescan folders", scale=0, min_width=160, size="md", elem_id="rescan")

        with gr.Tab("Generate", elem_id="tab-generate"):
            with gr.Row():
                with gr.Column(scale=2, min_width=340):
                    adapters = gr.Dropdown(adapter_choices, value=[], multiselect=True, label="Adapters", elem_id="adapters",
                                           info="Found in the runs and outputs folders; each gets a scale slider")

                    @gr.render(inputs=adapters)
                    def scale_sliders(selected):
                        selected = list(selected or [])
                        sliders = _sliders(app, selected, "Scale")
                        generate.click(
                            shown("Generate", lambda: (gr.skip(),) * 3)(lambda *v, progress=track(): _compare(app, selected, *v, progress=progress)),
                            inputs=[model, prompt, negative, seed, steps, guidance, bucket, *sliders],
                            outputs=[base_image, adapted_image, info],
                        )
                        sweep_button.click(
                            shown("Scale sweep", gr.skip)(lambda *v, progress=track(): _sweep(app, selected, *v, progress=progress)),
                            inputs=[model, prompt, negative, seed, steps, guidance, bucket, swept, sweep_values, *sliders],
                            outputs=[sweep_image],
                        )

                    with gr.Accordion("Add an adapter by path", open=False):
                        add_path = gr.Textbox(label="Adapter folder or .safetensors file", elem_id="add-path",
                                              placeholder="runs/my-style/final (under the allowed folders)")
                        add_button = gr.Button("Add", size="sm", elem_id="add-adapter")
                    prompt = gr.Textbox("a photo of a cat", label="Prompt", lines=2, elem_id="prompt", interactive=True)
                    negative = gr.Textbox(label="Negative prompt", elem_id="negative", interactive=True)
                    with gr.Row():
                        seed = gr.Number(0, precision=0, minimum=0, label="Seed", elem_id="seed", interactive=True)
                        bucket = gr.Dropdown(bucket_choices(buckets), value=square_bucket(buckets), label="Size (width × height)",
                                             elem_id="bucket", interactive=True)
                    with gr.Row():
                        steps = gr.Slider(1, 100, value=20, step=1, label="Steps", elem_id="steps", interactive=True)
                        guidance = gr.Slider(1.0, 15.0, value=4.5, step=0.5, label="Guidance", elem_id="guidance", interactive=True)
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    with gr.Accordion("Scale sweep", open=False):
                        swept = gr.Dropdown([], label="Adapter to sweep", elem_id="swept", interactive=True)
                        sweep_values = gr.Textbox("0, 0.5, 1, 1.5", label="Scales", elem_id="sweep-values", interactive=True)
                        sweep_button = gr.Button("Sweep", elem_id="sweep")
                with gr.Column(scale=3):
                    with gr.Row():
                        base_image = gr.Image(label="Base model", type="pil", format="png", interactive=False, elem_id="base-image")
                        adapted_image = gr.Image(label="With adapters", type="pil", format="png", interactive=False, elem_id="adapted-image")
                    info = gr.Markdown("Same seed on both sides: the difference is the adapters.", elem_id="info")
                    sweep_image = gr.Image(label="Scale sweep", type="pil", format="png", interactive=False, visible=False, elem_id="sweep-image")

        with gr.Tab("Merge", elem_id="tab-merge"):
            with gr.Row():
                with gr.Column(scale=2, min_width=340):
                    merge_adapters = gr.Dropdown(adapter_choices, value=[], multiselect=True, label="Adapters to merge", elem_id="merge-adapters",
                                                 info="Each gets a weight slider")

                    @gr.render(inputs=merge_adapters)
                    def weight_sliders(selected):
                        selected = list(selected or [])
                        sliders = _sliders(app, selected, "Weight")
                        # The menus are updated only after a merge succeeded, so a refused
                        # merge leaves them (and the user's selection) as they were.
                        merge_button.click(
                            shown("Merge", lambda: (gr.skip(), gr.skip(), ""))(lambda *v, progress=track(): _merge(app, selected, *v, progress=progress)),
                            inputs=[model, method, rank, out_name, *sliders],
                            outputs=[merge_result, merged_file, written],
                        ).success(functools.partial(_after_merge, app), inputs=[written, method, extra], outputs=[adapters, merge_adapters, model])

                    method = gr.Radio([(text, key) for key, text in MERGE_METHODS.items()], value="linear", label="Method",
                                      elem_id="method", interactive=True)
                    rank = gr.Number(8, precision=0, minimum=1, label="Rank (svd only)", elem_id="rank", interactive=True)
                    out_name = gr.Textbox(label="Output name", placeholder="style-mix", elem_id="out-name", interactive=True,
                                          info=f"A new folder under {settings.outputs}")
                    merge_button = gr.Button("Merge", variant="primary", elem_id="merge")
                with gr.Column(scale=3):
                    merge_result = gr.Markdown("Merged adapters appear in the Generate tab's adapters; fused models in the base model menu.",
                                               elem_id="merge-result")
                    merged_file = gr.File(label="Merged adapter weights", interactive=False, elem_id="merged-file")

        def rescan_folders(selected, merging, current_extra):
            choices = app.adapter_choices(current_extra)
            values = {value for _, value in choices}
            return (
                gr.Dropdown(choices=choices, value=[p for p in selected or [] if p in values]),
                gr.Dropdown(choices=choices, value=[p for p in merging or [] if p in values]),
                gr.Dropdown(choices=app.model_choices()),
            )

        # Each page load rescans too, so adapters trained since the start are offered.
        for trigger in (rescan.click, demo.load):
            trigger(rescan_folders, [adapters, merge_adapters, extra], [adapters, merge_adapters, model])

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

        for trigger in (add_button.click, add_path.submit):
            trigger(add_adapter, [add_path, adapters, extra], [adapters, merge_adapters, extra, add_path])

        adapters.change(
            lambda selected, current: gr.Dropdown(
                choices=[(app.label(p), p) for p in selected or []],
                value=current if current in (selected or []) else next(iter(selected or []), None),
            ),
            [adapters, swept],
            swept,
        )

        def change_model(name, progress=track()):
            # A model that cannot load is a warning and the menu goes back to the loaded
            # model: an error would mark the size menu failed and block it.
            try:
                progress(0.0, desc=f"loading {name}")
                with app.holder.lock:
                    sizes = app.holder.get(app.check_model(name)).buckets()
            except Exception as error:
                if not isinstance(error, UserError):
                    log.exception("loading %s failed", name)
                gr.Warning(str(error), title="Base model: not loaded")
                return gr.skip(), gr.Dropdown(value=app.holder.loaded or settings.models[0])
            return gr.Dropdown(choices=bucket_choices(sizes), value=square_bucket(sizes)), gr.skip()

        model.change(change_model, model, [bucket, model])

    demo.queue(default_concurrency_limit=1)
    _quiet_rejections(demo)
    return demo


def _quiet_rejections(demo) -> None:
    """Values Gradio itself rejects (a number under its minimum, a menu value no longer offered) without tracebacks.

    Gradio raises a ``gr.Error`` for them, shown on the page like ours, and prints
    a traceback for every ``gr.Error`` whose ``print_exception`` is left on, which
    its own are: a console full of tracebacks for typing -1 into a seed. Other
    exceptions keep theirs.
    """
    import gradio as gr

    process_api = demo.process_api

    @functools.wraps(process_api)
    async def quiet(*args, **kwargs):
        try:
            return await process_api(*args, **kwargs)
        except gr.Error as error:
            error.print_exception = False
            raise

    demo.process_api = quiet


def _sliders(app: PreviewApp, selected: list[str], kind: str) -> list:
    """One slider per selected adapter, keyed by path so a value survives re-renders."""
    import gradio as gr

    return [
        gr.Slider(-2, 2, value=1.0, step=0.05, label=f"{kind}: {app.label(p)}", key=f"{kind.lower()}-{p}", interactive=True)
        for p in selected
    ]


def _compare(app: PreviewApp, selected, model, prompt, negative, seed, steps, guidance, bucket, *scales, progress):
    import gradio as gr

    base, adapted = app.compare(model, prompt, negative, seed, steps, guidance, bucket, selected, scales, progress)
    if adapted is None:
        gr.Warning("No adapter selected: showing the base model only. Pick adapters to compare.")
    parts = ", ".join(f"{app.label(p)} x{s:g}" for p, s in zip(selected, scales)) or "none"
    height, _, width = str(bucket).partition("x")
    text = f"Seed {int(seed)}, {int(steps)} steps, guidance {float(guidance):g}, {width} × {height}. Adapters: {parts}."
    return base, adapted, text


def _sweep(app: PreviewApp, selected, model, prompt, negative, seed, steps, guidance, bucket, swept, values, *scales, progress):
    import gradio as gr

    grid = app.sweep(model, prompt, negative, seed, steps, guidance, bucket, selected, scales, swept, values, progress)
    return gr.Image(value=grid, visible=True)


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


def launch_kwargs(settings: AppSettings) -> dict[str, Any]:
    """Arguments for ``Blocks.launch``: Gradio may serve files from the outputs folder only."""
    settings.outputs.mkdir(parents=True, exist_ok=True)
    return dict(
        server_name=settings.host,
        server_port=settings.port,
        share=settings.share,
        allowed_paths=[str(settings.outputs)],
        show_error=False,
        # No "Running on local URL" and no "set `share=True` in `launch()`" hint (the flag is --share): launch() says where it serves.
        quiet=True,
    )
