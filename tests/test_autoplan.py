"""Spending a memory budget: plan lists batch size x gradient checkpointing against the
budget and names the fastest that fits; ``gradient_checkpointing: auto`` trains with
the least recomputation that fits (XL-2 counted on the meta device, no GPU)."""

from __future__ import annotations

import dataclasses

import pytest

from pixart_tune.commands.plan import main as cli
from pixart_tune.models import XL2_TRANSFORMER_CONFIG
from pixart_tune.training import autoplan
from pixart_tune.training.autoplan import FORWARD_SHARE, checkpoint_modes, fastest, recompute_cost, resolve_auto
from pixart_tune.training.config import TrainConfig
from pixart_tune.training.memory import EMA_ROW
from tests.conftest import REPO
from tests.training_fixtures import red_dataset, tiny_config  # noqa: F401  (red_dataset: a fixture)

XL2_LAYERS = XL2_TRANSFORMER_CONFIG["num_layers"]


def test_recomputing_blocks_costs_their_forward():
    assert recompute_cost(False, XL2_LAYERS) == 1.0
    assert recompute_cost(True, XL2_LAYERS) == pytest.approx(1 + FORWARD_SHARE)
    assert recompute_cost(2, XL2_LAYERS) == pytest.approx(1 + FORWARD_SHARE / 2)  # blocks 0, 2, ..., 26: half
    assert FORWARD_SHARE == pytest.approx(0.427, abs=1e-3)
    # Every mode recomputes another number of blocks, in rising order.
    counts = [recompute_cost(m, XL2_LAYERS) for m in checkpoint_modes(XL2_LAYERS)]
    assert counts == sorted(set(counts)) and checkpoint_modes(XL2_LAYERS)[0] is False and checkpoint_modes(XL2_LAYERS)[-1] is True


@pytest.fixture
def xl2(monkeypatch):
    """The real architecture by hub id, without reaching the hub."""
    monkeypatch.setattr(autoplan, "architecture", lambda model: dict(XL2_TRANSFORMER_CONFIG))
    return TrainConfig(dtype="bf16", resolution=1024)


def test_the_fastest_choice_is_the_least_recomputation_that_fits_then_the_largest_batch(xl2):
    found = autoplan.options(xl2, 1024, 24.0, batch_sizes=(1, 2, 4))
    by = {(o.batch_size, o.checkpointing): o for o in found}
    # Memory falls as more blocks are recomputed and rises with the batch.
    for batch in (2, 4):
        peaks = [by[batch, m].plan.peak_gib for m in checkpoint_modes(XL2_LAYERS)]
        assert peaks == sorted(peaks, reverse=True)
    assert by[4, False].plan.peak_gib > by[2, False].plan.peak_gib
    best = fastest(found)
    assert best is not None and best.fits
    assert all(not o.fits or (o.cost, -o.batch_size) >= (best.cost, -best.batch_size) for o in found)
    assert fastest([o for o in found if o.batch_size == 4 and o.checkpointing is False and not o.fits]) is None


def test_auto_takes_the_least_recomputation_that_fits_the_budget(xl2):
    config = dataclasses.replace(xl2, gradient_checkpointing="auto", data=dataclasses.replace(xl2.data, batch_size=4))
    roomy, choice = resolve_auto(dataclasses.replace(config, memory_budget_gb=141.0), 1024)
    assert roomy.gradient_checkpointing is False and choice.fits
    tight, choice = resolve_auto(config, 1024)  # 24 GiB: batch 4 without recomputation needs about 30
    assert tight.gradient_checkpointing not in (False, "auto") and choice.fits
    assert choice.plan.peak_gib <= 24.0
    hopeless, choice = resolve_auto(dataclasses.replace(config, memory_budget_gb=2.0), 1024)
    assert hopeless.gradient_checkpointing is True and not choice.fits  # nothing fits: the least memory, and plan says so


def test_plan_names_the_fastest_batch_and_checkpointing_that_fit(capsys):
    recipe = str(REPO / "recipes" / "style_lora_1024_24gb.yaml")
    assert cli([recipe, "gradient_checkpointing=auto"]) == 0
    out = capsys.readouterr().out
    assert "gradient_checkpointing auto -> " in out
    assert "predicted peak GiB by batch size and gradient_checkpointing (budget 24 GiB" in out
    assert "fastest that fits: data.batch_size=" in out
    assert cli([recipe, "--budget-gb", "0.5"]) == 3
    assert "nothing fits 0.5 GiB" in capsys.readouterr().out


def test_a_training_run_with_auto_checkpoints_what_its_budget_needs(tiny_model, red_dataset, tmp_path):  # noqa: F811
    """The tiny model's peaks differ by kilobytes: a budget above all of them trains
    without recomputation, one between the two smallest checkpoints every block."""
    from pixart_tune.training.trainer import Trainer

    probe = tiny_config(tiny_model, red_dataset, tmp_path / "probe", "gradient_checkpointing=auto")
    peaks = {o.checkpointing: o.plan.peak_gib for o in autoplan.options(probe, 256, 1e9, (probe.data.batch_size,))}
    between = (peaks[True] + min(peak for mode, peak in peaks.items() if mode is not True)) / 2
    for budget, everything in ((max(peaks.values()) + 1, False), (between, True)):
        config = tiny_config(tiny_model, red_dataset, tmp_path / f"run-{everything}", "gradient_checkpointing=auto", f"memory_budget_gb={budget}")
        trainer = Trainer(config, progress=False)
        trainer.setup()
        try:
            layers = trainer.transformer.config.num_layers
            assert trainer.checkpointed_blocks == (list(range(layers)) if everything else [])
        finally:
            trainer.cleanup()


def test_auto_makes_room_for_the_ema_shadow(xl2):
    """A budget that batch 4 without recomputation fits by less than the EMA shadow
    (4 bytes a LoRA weight) needs recomputation once the recipe keeps an EMA."""
    config = dataclasses.replace(xl2, gradient_checkpointing="auto", data=dataclasses.replace(xl2.data, batch_size=4))
    without = autoplan.options(config, 1024, 1e9, (4,))[0]
    lora = without.plan.rows[1][1] / 4  # "LoRA weights (fp32)": 4 bytes a weight
    ema = dataclasses.replace(config, ema=dataclasses.replace(config.ema, enabled=True))
    budget = (without.plan.total_bytes + 2 * lora) / 2**30  # room for half the shadow
    assert without.checkpointing is False
    assert resolve_auto(dataclasses.replace(config, memory_budget_gb=budget), 1024)[0].gradient_checkpointing is False
    chosen, choice = resolve_auto(dataclasses.replace(ema, memory_budget_gb=budget), 1024)
    assert chosen.gradient_checkpointing is not False and choice.fits
    assert dict(choice.plan.rows)[EMA_ROW] == 4 * lora
