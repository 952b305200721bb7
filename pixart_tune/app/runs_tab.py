"""The Runs tab: a training run's config, loss curves, validation grids and checkpoints, and a checkpoint into the Generate tab.

The curves are a ``gr.LinePlot`` of loss.json (training and held-out loss in one
plot, one colour each, with a legend) rather than the trainer's loss.png: its
tooltips give the exact step and value of each point, which is what picking a
checkpoint needs, and it redraws to the page's width (a phone included); the
lowest held-out loss, which loss.png marks, is the line under it. The CLIP score,
on another scale, gets its own small plot when the run measured it.
"""

from __future__ import annotations

import itertools
import math
from functools import reduce

from pixart_tune.app.page import Page, shown
from pixart_tune.app.runs import (
    RunInfo,
    find_run,
    list_runs,
    load_image,
    lowest_text,
    summary_text,
)
from pixart_tune.app.service import PreviewApp
from pixart_tune.errors import UserError
from pixart_tune.training.plots import CLIP, EVAL, TRAIN

SERIES = {TRAIN: "training loss", EVAL: "held-out loss"}
EMPTY = "No training run here yet: `pixart-tune train RECIPE output_dir={runs}/NAME` writes one; then press **Rescan runs**."


def build(page: Page, app: PreviewApp) -> None:
    """The tab's widgets and listeners."""
    import gradio as gr

    runs_root = app.settings.runs
    choices = _run_choices(app)
    with gr.Tab("Runs", id="runs", elem_id="tab-runs") as tab:
        with gr.Row():
            run = gr.Dropdown(choices, value=None, label="Run", elem_id="run", scale=5, min_width=280, interactive=True,
                              info="Training runs (output_dir) under the runs folder, newest first")
            rescan = gr.Button("Rescan runs", scale=0, min_width=140, size="md", elem_id="rescan-runs")
        summary = gr.Markdown(EMPTY.format(runs=runs_root) if not choices else "Choose a run.", elem_id="run-summary")
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                losses = gr.LinePlot(x="step", y="loss", color="series", label="Loss", elem_id="run-loss", x_title="optimizer step",
                                     y_title="loss", color_title="", buttons=["export"])
                clip = gr.LinePlot(x="step", y="CLIP score", label="CLIP score of the validation images", elem_id="run-clip",
                                   x_title="optimizer step", height=180, visible=False)
                lowest = gr.Markdown(elem_id="run-lowest")
                checkpoint = gr.Dropdown([], label="Checkpoints", elem_id="run-checkpoint", interactive=True,
                                         info="The final adapter, then the checkpoints, latest first")
                preview = gr.Button("Preview this checkpoint", variant="primary", elem_id="preview-checkpoint")
            with gr.Column(scale=1, min_width=320):
                grid = gr.Image(label="Validation grid", type="pil", format="png", interactive=False, elem_id="run-grid")
                grid_step = gr.Slider(0, 1, value=0, step=1, label="Validation step", elem_id="run-grid-step", visible=False,
                                      interactive=True, info="The grid drawn at this step (or the last one before it)")
                base = gr.Image(label="Base model (adapter off): hold each step's grid against it", type="pil", format="png",
                                interactive=False, elem_id="run-base-grid")
        with gr.Accordion("Config (config.yaml, the resolved recipe)", open=False, elem_id="run-config-box"):
            config = gr.Code(language="yaml", interactive=False, label="config.yaml", elem_id="run-config", max_lines=40)

    nothing = lambda: (gr.skip(),) * 9

    @shown("Open a run", nothing)
    def open_run(name):
        if not name:
            return nothing()
        info = find_run(runs_root, name, app.guard)
        notes = list(info.notes)
        step = info.grid_at(None)
        shown_grid = load_image(step.path if step else None, app.guard, notes)
        base_grid = load_image(info.base_grid, app.guard, notes)
        info.notes = notes
        return (
            summary_text(info),
            _loss_frame(info),
            gr.LinePlot(value=_clip_frame(info), visible=bool(info.history.get(CLIP))),
            lowest_text(info),
            gr.Dropdown(choices=[(_adapter_label(info, a), str(a.path)) for a in info.adapters],
                        value=str(info.adapters[0].path) if info.adapters else None),
            gr.Image(value=shown_grid, label=f"Validation grid, step {step.step}" if step else "Validation grid (none drawn yet)"),
            _slider(info),
            base_grid,
            info.config,
        )

    run.change(open_run, run, [summary, losses, clip, lowest, checkpoint, grid, grid_step, base, config], api_visibility="private")

    @shown("Validation grid", lambda: gr.skip())
    def move_grid(name, step):
        if not name:
            return gr.skip()
        info = find_run(runs_root, name, app.guard)
        at = info.grid_at(step)
        if at is None:
            return gr.Image(value=None, label="Validation grid (none drawn yet)")
        return gr.Image(value=load_image(at.path, app.guard), label=f"Validation grid, step {at.step}")

    grid_step.change(move_grid, [run, grid_step], grid, api_visibility="private", show_progress="hidden")

    def rescan_runs():
        # Choices only: the value the browser holds stays (a run picked while this ran is kept).
        choices = _run_choices(app)  # listed now, not as at start
        return gr.Dropdown(choices=choices), gr.skip() if choices else EMPTY.format(runs=runs_root)

    # Opening the tab rescans too, so runs started since the page loaded are listed.
    # The page's "Rescan folders" too.
    for trigger in (rescan.click, tab.select, page.rescan.click):
        trigger(rescan_runs, None, [run, summary], api_visibility="private", show_progress="hidden")

    @shown("Preview this checkpoint", lambda: (gr.skip(),) * 4)
    def preview_checkpoint(name, chosen, current_extra):
        info = find_run(runs_root, name, app.guard)
        # Only an adapter of this run, checked again by the app's own adapter check.
        paths = {str(a.path) for a in info.adapters}
        if chosen not in paths:
            raise UserError("choose one of this run's checkpoints (the list changed: pick the run again)")
        path = str(app.check_adapter(chosen))
        extra = list(current_extra or [])
        if path not in {value for _, value in app.adapter_choices(extra)}:
            extra.append(path)
        choices = app.adapter_choices(extra)
        gr.Info(f"{info.name}: {_adapter_label(info, next(a for a in info.adapters if str(a.path) == chosen))} is selected in the Generate tab.")
        return gr.Dropdown(choices=choices, value=[path]), gr.Dropdown(choices=choices), extra, gr.Tabs(selected="generate")

    preview.click(preview_checkpoint, [run, checkpoint, page.extra], [page.adapters, page.merge_adapters, page.extra, page.tabs],
                  api_visibility="private")


def _run_choices(app: PreviewApp) -> list[tuple[str, str]]:
    return [(info.name, info.name) for info in list_runs(app.settings.runs, app.guard)]


def _adapter_label(info: RunInfo, adapter) -> str:
    if adapter.step is not None and info.lowest is not None and adapter.step == info.lowest[0]:
        return f"{adapter.label} (lowest held-out loss)"
    return adapter.label


def _loss_frame(info: RunInfo):
    """step / loss / series rows of the training and held-out losses."""
    import pandas as pd

    rows = [(step, value, SERIES[name]) for name in SERIES for step, value in info.history.get(name, [])]
    return pd.DataFrame(rows, columns=["step", "loss", "series"])


def _clip_frame(info: RunInfo):
    import pandas as pd

    return pd.DataFrame(info.history.get(CLIP, []), columns=["step", "CLIP score"])


def _slider(info: RunInfo):
    """A slider over the grids' steps: the gcd of their gaps as its step, so each grid is one position."""
    import gradio as gr

    steps = [g.step for g in info.grids]
    if len(steps) < 2:
        return gr.Slider(visible=False)
    gap = reduce(math.gcd, (b - a for a, b in itertools.pairwise(steps))) or 1
    return gr.Slider(minimum=steps[0], maximum=steps[-1], step=gap, value=steps[-1], visible=True,
                     label=f"Validation step ({len(steps)} grids, steps {steps[0]} to {steps[-1]})")
