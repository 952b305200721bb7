"""What a run reports as it trains: trackers (TensorBoard, Weights & Biases), the loss history and its plot.

Trackers go through accelerate's, so the main process alone writes and the same
calls serve both. They are built before the Accelerator (which takes them) but
start only in :meth:`RunLog.start`, once the output folder exists. The loss
history (loss.json, loss.png) is written whatever the trackers are: it is what
the model card and the app read.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pixart_tune.base import LOSS_PLOT
from pixart_tune.config import to_dict
from pixart_tune.errors import UserError
from pixart_tune.training import plots
from pixart_tune.training.config import LoggingSection

logger = logging.getLogger(__name__)

LOGS = "logs"
"""OUTPUT_DIR/logs: TensorBoard's event files."""


def make_trackers(settings: LoggingSection, output_dir: Path) -> list[Any]:
    """accelerate trackers for ``logging.report_to`` (not started yet)."""
    trackers = []
    for name in settings.report_to:
        if name == "tensorboard":
            from accelerate.tracking import TensorBoardTracker

            # run name "logs" under OUTPUT_DIR: the event files land in OUTPUT_DIR/logs.
            trackers.append(TensorBoardTracker(LOGS, output_dir))
        elif name == "wandb":
            try:
                import wandb
            except ImportError as error:
                # Missing, or installed but broken (a dependency of its own): one line either way.
                why = "is not installed" if error.name == "wandb" else f"fails to import ({error})"
                raise UserError(f"logging.report_to lists wandb, which {why}: pip install 'pixart-tune[wandb]' (or drop wandb from report_to)") from None
            from accelerate.tracking import WandBTracker

            # wandb's own banner and sync lines are not ours to print; the run's link is (RunLog.start).
            trackers.append(WandBTracker(settings.project, name=Path(output_dir).name, dir=str(output_dir), settings=wandb.Settings(silent=True)))
    return trackers


def flat_config(config: Any) -> dict[str, Any]:
    """The recipe as ``section.key`` -> scalar: what TensorBoard's hparams and wandb's config take."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[prefix] = "null" if value is None else value
        else:
            flat[prefix] = str(value)

    walk("", to_dict(config))
    return flat


class RunLog:
    """Scalars and images to the trackers, the loss history to loss.json / loss.png (main process)."""

    def __init__(self, accelerator, output_dir: Path, is_main: bool, up_to_step: int):
        self.accelerator, self.output_dir, self.is_main = accelerator, Path(output_dir), is_main
        # Points after the step resumed from are trained again: dropped, not doubled.
        self.history = plots.LossHistory.load(self.output_dir, up_to_step)

    def start(self, config: Any) -> None:
        """Starts the trackers (main process); output_dir exists by now."""
        if not self.accelerator.log_with:
            return
        self.accelerator.init_trackers(LOGS, config=flat_config(config))
        if self.is_main:
            for tracker in self.accelerator.trackers:
                if tracker.name == "wandb":
                    logger.info("wandb: %s", _wandb_where(tracker.run))

    def scalars(self, values: dict[str, float], step: int, series: dict[str, str] | None = None) -> None:
        """Logs ``values`` at ``step``; keys named in ``series`` also join the loss history under that name."""
        if not self.is_main:
            return
        if series:
            for key, name in series.items():
                if key in values and math.isfinite(values[key]):
                    self.history.add(name, step, values[key])
            self.history.save()
        if self.accelerator.trackers:
            self.accelerator.log(values, step=step)

    def image(self, tag: str, image: Image.Image, step: int) -> None:
        """One image (a validation grid) to every tracker that shows images."""
        if not self.is_main:
            return
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                import numpy as np

                tracker.writer.add_image(tag, np.asarray(image), step, dataformats="HWC")
            elif tracker.name == "wandb":
                tracker.log_images({tag: [image]}, step=step)

    def plot(self, title: str) -> Path | None:
        """OUTPUT_DIR/loss.png from the history (main process)."""
        if not self.is_main:
            return None
        return plots.plot_loss(self.history, self.output_dir / LOSS_PLOT, title=title)


def _wandb_where(run: Any) -> str:
    """Where a wandb run can be seen: its page, or the folder of an offline run and how to upload it."""
    # An offline run's ``url`` prints a warning of wandb's own on the console: ask ``offline`` first.
    if getattr(run, "offline", False):
        folder = Path(run.dir).parent  # run.dir is the run's files/ folder
        return f"offline run in {folder} (upload it with 'wandb sync {folder}')"
    return str(run.url)


class Window:
    """Loss and throughput accumulated on the device between two log points."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), device=device)
        self.reset()

    def add(self, loss: torch.Tensor, samples: int) -> None:
        self.loss_sum += loss
        self.count += 1
        self.samples += samples

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.count = 0
        self.samples = 0
        self.start = time.perf_counter()


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # Peak resident set size of the process (Linux reports KiB).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
