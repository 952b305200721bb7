"""A run's loss history (OUTPUT_DIR/loss.json) and its plot (OUTPUT_DIR/loss.png).

The trainer adds a point at every log point (the mean loss of the steps since the
previous one) and saves the history each time, so a crash loses nothing that was
logged. A resumed run keeps only the points up to the step it resumes from: the
steps after that are trained again and would otherwise appear twice.

The history holds named series of (step, value) points: ``train`` now; an
evaluation loss can be added as another series and is drawn in the same plot.
"""

from __future__ import annotations

import json
from pathlib import Path

from pixart_tune.base import LOSS_HISTORY
from pixart_tune.fsutil import atomic_path

TRAIN = "train"
"""The series of training losses, one point per log point (``logging.every`` steps)."""

_LABELS = {TRAIN: "training loss (mean over each logging window)", "eval": "evaluation loss"}


class LossHistory:
    """Series name -> [(step, value), ...], kept in ``path`` as JSON."""

    def __init__(self, path: str | Path, series: dict[str, list[tuple[int, float]]] | None = None):
        self.path = Path(path)
        self.series: dict[str, list[tuple[int, float]]] = series or {}

    @classmethod
    def load(cls, output_dir: str | Path, up_to_step: int) -> "LossHistory":
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


def plot_loss(history: LossHistory, path: str | Path, title: str = "") -> Path:
    """Draws every series of ``history`` against the optimizer step into a PNG at ``path``.

    Uses matplotlib's Agg canvas directly (no pyplot), so no global backend is set in
    the process that trains.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, points in history.series.items():
        steps, values = zip(*points) if points else ((), ())
        axes.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=_LABELS.get(name, name))
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.set_title(title or "loss")
    axes.grid(True, alpha=0.3)
    if history.series:
        axes.legend(loc="upper right")
    else:
        axes.text(0.5, 0.5, "no loss logged yet", ha="center", va="center", transform=axes.transAxes)
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return path
