"""Choosing how to spend a memory budget: the batch size and gradient checkpointing
that fit it, and the fastest of those (``pixart-tune plan --budget-gb``,
``gradient_checkpointing: auto``).

Speed is estimated, not measured: a checkpointed block runs its forward twice, and
the forward is 6.69 of the 15.66 TFLOP of an XL-2 LoRA step per 1024 px sample
(counted on the meta device, see docs/benchmarks.md), so recomputing r of L blocks
costs about ``1 + 0.43 r / L`` times the compute of a step without recomputation.
Among choices of equal recomputation a larger batch is taken as faster: it keeps the
GPU busy longer per kernel launch. Both are rules to rank choices, not timings; the
GPU check measures the real figures.
"""

from __future__ import annotations

import dataclasses

from pixart_tune.training.config import TrainConfig
from pixart_tune.training.memory import MemoryPlan, architecture, plan_memory
from pixart_tune.training.speed import CheckpointSetting, checkpointed_blocks

FORWARD_SHARE = 6.69 / 15.66
"""The forward pass's share of a LoRA training step's FLOPs (XL-2, 1024 px)."""
BATCH_SIZES = (1, 2, 4, 8, 16)
CHECKPOINT_INTERVALS = (4, 3, 2)
"""Every k-th block checkpointed, between none and all."""


@dataclasses.dataclass(frozen=True)
class Option:
    batch_size: int
    checkpointing: CheckpointSetting
    plan: MemoryPlan
    cost: float
    """Estimated compute per sample relative to no recomputation (1.0)."""

    @property
    def fits(self) -> bool:
        return self.plan.fits


def recompute_cost(setting: CheckpointSetting, layers: int) -> float:
    """Compute per sample relative to no checkpointing: each recomputed block adds its forward."""
    return 1.0 + FORWARD_SHARE * len(checkpointed_blocks(setting, layers)) / layers


def checkpoint_modes(layers: int) -> list[CheckpointSetting]:
    """Modes from least to most recomputation, each recomputing a different number of blocks."""
    modes: list[CheckpointSetting] = [False]
    seen = {0}
    for setting in (*CHECKPOINT_INTERVALS, True):
        count = len(checkpointed_blocks(setting, layers))
        if count not in seen:
            seen.add(count)
            modes.append(setting)
    return modes


def options(config: TrainConfig, resolution: int, budget_gib: float, batch_sizes: tuple[int, ...] = BATCH_SIZES) -> list[Option]:
    """Every batch size x checkpointing mode, planned against ``budget_gib``."""
    arch = architecture(config.model)
    found = []
    for batch in batch_sizes:
        for setting in checkpoint_modes(arch["num_layers"]):
            trial = dataclasses.replace(config, gradient_checkpointing=setting, data=dataclasses.replace(config.data, batch_size=batch))
            plan = plan_memory(trial, resolution, budget_gib, transformer_config=arch)
            found.append(Option(batch, setting, plan, recompute_cost(setting, arch["num_layers"])))
    return found


def fastest(found: list[Option]) -> Option | None:
    """The fitting option with the least recomputation, then the largest batch."""
    fitting = [option for option in found if option.fits]
    return min(fitting, key=lambda o: (o.cost, -o.batch_size)) if fitting else None


def choose_checkpointing(config: TrainConfig, resolution: int) -> Option:
    """``gradient_checkpointing: auto``: at the recipe's batch size, the least
    recomputation that fits ``memory_budget_gb`` (every block when nothing fits).

    What must fit is the whole plan (:func:`plan_memory`): the EMA shadow and loss
    masks when the recipe has them, and the start-up and validation peaks, which no
    checkpointing mode lowers."""
    found = options(config, resolution, config.memory_budget_gb, (config.data.batch_size,))
    return fastest(found) or found[-1]


def describe(setting: CheckpointSetting) -> str:
    if setting is True:
        return "true (every block)"
    if setting is False:
        return "false"
    return f"{setting} (every {setting}th block)"


def resolve_auto(config: TrainConfig, resolution: int) -> tuple[TrainConfig, Option | None]:
    """``config`` with ``gradient_checkpointing: auto`` replaced by its choice (and the choice); others as they are."""
    if config.gradient_checkpointing != "auto":
        return config, None
    choice = choose_checkpointing(config, resolution)
    return dataclasses.replace(config, gradient_checkpointing=choice.checkpointing), choice
