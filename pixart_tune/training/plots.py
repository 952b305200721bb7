"""A run's loss history (OUTPUT_DIR/loss.json) and its plot (OUTPUT_DIR/loss.png).

The trainer adds a point at every log point (the mean loss of the steps since the
previous one) and saves the history each time, so a crash loses nothing that was
logged. A resumed run keeps only the points up to the step it resumes from: the
steps after that are trained again and would otherwise appear twice.

The history holds named series of (step, value) points: the training loss, the
held-out evaluation loss and the CLIP score of the validation images. The losses
share one axis; the CLIP score, on another scale, gets its own panel.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from pixart_tune.base import LOSS_HISTORY
from pixart_tune.fsutil import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TRAIN = "train"
"""The series of training losses, one point per log point (``logging.every`` steps)."""
EVAL = "eval"
"""The held-out loss at fixed timesteps and noise, one point per evaluation."""
CLIP = "clip_score"
"""The mean CLIP score of the validation images against their prompts."""

OVERFIT_RISE = 0.02
"""A last held-out loss more than this fraction above the lowest is called over-fitting (below it, noise)."""

_LABELS = {TRAIN: "training loss (mean over each logging window)", EVAL: "held-out loss (fixed timesteps and noise)", CLIP: "CLIP score"}


class LossHistory:
    """Series name -> [(step, value), ...], kept in ``path`` as JSON."""

    def __init__(self, path: str | Path, series: dict[str, list[tuple[int, float]]] | None = None):
        self.path = Path(path)
        self.series: dict[str, list[tuple[int, float]]] = series or {}

    @classmethod
    def load(cls, output_dir: str | Path, up_to_step: int) -> LossHistory:
        """The history of ``output_dir`` with every point after ``up_to_step`` dropped
        (0 for a fresh run: nothing from an earlier run in the folder is kept)."""
        path = Path(output_dir) / LOSS_HISTORY
        series: dict[str, list[tuple[int, float]]] = {}
        if up_to_step > 0 and path.is_file():
            try:
                stored = json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                stored = {}  # a hand-edited or foreign file: start the plot again, never stop training
            for name, points in stored.items():
                kept = [(int(step), float(value)) for step, value in points if int(step) <= up_to_step]
                if kept:
                    series[name] = kept
        return cls(path, series)

    def add(self, name: str, step: int, value: float) -> None:
        self.series.setdefault(name, []).append((int(step), float(value)))

    def save(self) -> None:
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(self.series), encoding="utf-8")


def lowest_eval(history: LossHistory) -> tuple[int, float, float] | None:
    """(step, value, rise) of the lowest held-out loss, where ``rise`` is how far the
    last evaluation sits above it (0.08 = 8% higher); None without two evaluations.

    A held-out loss that bottoms out and climbs while the training loss still falls
    is over-fitting: the adapter from around the lowest point generalises best.
    """
    points = history.series.get(EVAL, [])
    if len(points) < 2:
        return None
    step, value = min(points, key=lambda point: (point[1], point[0]))
    last = points[-1][1]
    return step, value, (last - value) / value if value > 0 else 0.0


def plot_loss(history: LossHistory, path: str | Path, title: str = "") -> Path:
    """Draws :func:`loss_figure` into a PNG at ``path``."""
    figure = loss_figure(history, title)
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return path


def loss_figure(history: LossHistory, title: str = "") -> Figure:
    """The losses against the optimizer step (the CLIP score, if any, in a panel below), as a matplotlib Figure.

    The lowest held-out loss is marked: where it lies well before the end, the run
    over-fitted after it. Uses matplotlib's Agg canvas directly (no pyplot), so no
    global backend is set in the process that trains.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    clip = history.series.get(CLIP, [])
    figure = Figure(figsize=(7, 5.5 if clip else 4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes, clip_axes = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1.3]) if clip else (figure.add_subplot(), None)
    losses = {name: points for name, points in history.series.items() if name != CLIP}
    for name, points in losses.items():
        steps, values = zip(*points) if points else ((), ())
        axes.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=_LABELS.get(name, name))
    best = lowest_eval(history)
    if best is not None:
        step, _, rise = best
        note = f"lowest held-out loss: step {step}" + (f" (+{rise:.0%} by the end: over-fitting after it)" if rise > OVERFIT_RISE else "")
        axes.axvline(step, color="grey", linestyle="--", linewidth=1, label=note)
    axes.set_ylabel("loss")
    axes.set_title(title or "loss")
    axes.grid(True, alpha=0.3)
    if losses:
        axes.legend(loc="upper right", fontsize="small")
    else:
        axes.text(0.5, 0.5, "no loss logged yet", ha="center", va="center", transform=axes.transAxes)
    if clip_axes is not None:
        steps, values = zip(*clip)
        clip_axes.plot(steps, values, marker="o", markersize=3, color="tab:green", label=_LABELS[CLIP])
        clip_axes.set_ylabel("CLIP score")
        clip_axes.grid(True, alpha=0.3)
        clip_axes.legend(loc="lower right", fontsize="small")
    (clip_axes or axes).set_xlabel("optimizer step")
    return figure
