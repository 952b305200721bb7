"""How a training run judges its adapter: validation grids, the held-out loss, CLIP scores.

A part of :class:`~pixart_tune.training.trainer.Trainer` (a mixin over its state)
kept apart so the trainer reads as setup + loop + saving. Everything here runs with
the weights the run would publish (:meth:`Judging.judged_weights`: schedule-free's
averaged point, the EMA when kept) and leaves the training weights, modes and RNG
streams exactly as it found them.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

import torch

from pixart_tune.base import BASE_GRID, SAMPLES
from pixart_tune.training import plots
from pixart_tune.training.optim import set_optimizer_mode
from pixart_tune.training.validation import save_grid

logger = logging.getLogger(__name__)


class Judging:
    """Validation, evaluation and their figures; needs the Trainer's attributes."""

    def validate(self) -> Path | None:
        """Renders the validation grid to samples/step-NNNNNN.png (main process).

        The first call of a run (or of a resumed run) also renders the base model,
        adapter off, to samples/base.png: the same prompts and seeds, to compare.
        """
        if self.validator is None:
            return None
        samples = Path(self.config.output_dir) / SAMPLES
        path = samples / f"step-{self.state.step:06d}.png"
        count = self.validator.images_due()
        logger.info("drawing %d validation image%s into %s", count, "s" * (count != 1), samples)
        with self.judged_weights():
            grid, base = self.validator.grids()
        step = self.state.step
        if base is not None:
            save_grid(base, samples / BASE_GRID)
            self.log.image("validation/base", base, step)
        save_grid(grid, path)
        self.log.image("validation", grid, step)
        scores = getattr(self.validator, "last_scores", None) or {}
        if scores:
            self.log.scalars(scores, step, series={"validation/clip_score": plots.CLIP})
            self.final_metrics.update(scores)
            logger.info("CLIP score at step %d: %.2f", step, scores["validation/clip_score"])
        return path

    def evaluate(self) -> dict[str, float]:
        """The held-out loss now (main process; the others wait): logged, plotted and kept for the model card."""
        results: dict[str, float] = {}
        if self.evaluator is not None:
            model = self.transformer
            was_training = model.training
            model.eval()  # no LoRA dropout: the number depends on the weights alone
            try:
                with self.judged_weights(), torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                    results = self.evaluator.evaluate(
                        lambda latents, noise, t, embeds, mask: self.loss.per_sample(model, latents, noise, t, embeds, mask),
                        self.device, self.dtype,
                    )
            finally:
                model.train(was_training)
            self.log.scalars(results, self.state.step, series={"eval/loss": plots.EVAL})
            self.final_metrics.update(results)
            logger.info("evaluation loss at step %d: %.4f", self.state.step, results["eval/loss"])
        self.accelerator.wait_for_everyone()
        return results

    @contextlib.contextmanager
    def judged_weights(self) -> Iterator[None]:
        """The weights validation, evaluation and the final adapter use: schedule-free's
        averaged point, and the EMA when the recipe keeps one; the training weights after."""
        set_optimizer_mode(self.optimizer, False)
        try:
            with self.ema.applied() if self.ema is not None else contextlib.nullcontext():
                yield
        finally:
            set_optimizer_mode(self.optimizer, True)

    def plot_loss(self) -> Path | None:
        """Draws the loss history (training, evaluation) to OUTPUT_DIR/loss.png (main process); returns its path."""
        return self.log.plot(title=f"{Path(self.config.output_dir).name}: loss")

    def _metrics(self) -> dict[str, float]:
        """The latest evaluation and CLIP figures, and the lowest held-out loss with its step."""
        metrics = {key: round(value, 6) for key, value in sorted(self.final_metrics.items())}
        best = plots.lowest_eval(self.log.history) if hasattr(self, "log") else None
        if best is not None:
            metrics["eval/loss_lowest"], metrics["eval/loss_lowest_step"] = round(best[1], 6), best[0]
        return metrics
