"""An exponential moving average of the trained LoRA weights.

The shadow is an fp32 copy of every trainable parameter, updated after optimizer
steps as ``shadow = decay * shadow + (1 - decay) * weight``. Averaging the last
~1 / (1 - decay) updates smooths the noise of small-batch LoRA training, which is
why SimpleTuner, OneTrainer and ai-toolkit offer it; the averaged weights are the
ones validated and saved as the adapter, the raw ones are kept beside them.

The schedule is a pure function of the step (:func:`updates_at`), so a resumed
run updates at exactly the steps the uninterrupted one would, and the shadow is
checkpointed bit for bit.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

from pixart_tune.training.config import EmaSection


def updates_at(step: int, settings: EmaSection) -> bool:
    """Whether optimizer step ``step`` (counted from 1) updates the shadow.

    Steps up to ``start_step`` copy the weights instead (the average starts from
    the weights as they are then, not from the zero-initialised LoRA B); after it,
    every ``every``-th step updates.
    """
    return step > settings.start_step and (step - settings.start_step) % settings.every == 0


def closed_form(weights: Sequence[torch.Tensor], settings: EmaSection) -> torch.Tensor:
    """The shadow after the last step, where ``weights[i]`` is the weight after step i (``weights[0]``: the initial one).

    The reference the tests hold :class:`LoraEma` against, written as the sum it
    unrolls to: the weight copied at ``start_step`` times decay^n, plus each of the n
    updates' weights times (1 - decay) * decay^(updates after it).
    """
    decay, start = settings.decay, settings.start_step
    last = len(weights) - 1
    anchor = min(start, last)
    updates = [step for step in range(anchor + 1, last + 1) if updates_at(step, settings)]
    total = weights[anchor].double() * decay ** len(updates)
    for order, step in enumerate(updates):
        total = total + (1 - decay) * decay ** (len(updates) - 1 - order) * weights[step].double()
    return total


class LoraEma:
    """The fp32 shadow of ``params``; :meth:`step` after each optimizer step."""

    def __init__(self, params: Sequence[torch.nn.Parameter], settings: EmaSection):
        self.params = list(params)
        self.settings = settings
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def step(self, step: int) -> None:
        """Follows optimizer step ``step`` (the new step count): copy, update or nothing."""
        if step <= self.settings.start_step:
            for shadow, param in zip(self.shadow, self.params):
                shadow.copy_(param.detach())
        elif updates_at(step, self.settings):
            # lerp_ computes shadow + (1 - decay) * (param - shadow): the same average, one kernel per tensor.
            torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - self.settings.decay)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the parameters hold the average; afterwards, exactly their own values again."""
        raw = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in self.params], self.shadow)
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in self.params], raw)

    def state_dict(self) -> dict[str, object]:
        return {"shadow": [s.cpu() for s in self.shadow], "decay": self.settings.decay}

    def load_state_dict(self, state: dict[str, object]) -> None:
        shadow = state["shadow"]
        if len(shadow) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(shadow, self.shadow)):
            raise ValueError(f"the EMA state holds {len(shadow)} tensors of other shapes than the {len(self.shadow)} trained ones")
        for mine, saved in zip(self.shadow, shadow):
            mine.copy_(saved)
