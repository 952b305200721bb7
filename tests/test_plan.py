"""``pixart-tune plan`` on the real-size PixArt-Sigma XL-2 architecture (meta device)."""

from __future__ import annotations

import pytest

from pixart_tune.commands.plan import main as cli
from pixart_tune.models import XL2_TRANSFORMER_CONFIG
from pixart_tune.training.config import TrainConfig, load_train_config
from pixart_tune.training.memory import plan_memory
from tests.conftest import REPO

RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))
GPU_RECIPES = [p for p in RECIPES if load_train_config(p).model.startswith("PixArt-alpha/")]


def _rows(plan):
    return dict(plan.rows)


def test_counts_of_the_real_architecture_are_exact():
    plan = plan_memory(TrainConfig(dtype="bf16", resolution=1024), 1024, transformer_config=XL2_TRANSFORMER_CONFIG)
    rows = _rows(plan)
    # 610,856,096 base weights in bf16; rank-16 LoRA on the 8 attention projections
    # (1152 -> 1152) of 28 blocks: 28 * 8 * 16 * (1152 + 1152) weights in fp32.
    assert rows["base weights (bf16)"] == 610_856_096 * 2
    assert rows["LoRA weights (fp32)"] == 28 * 8 * 16 * 2304 * 4
    assert rows["optimizer state (adamw8bit)"] == 28 * 8 * 16 * 2304 * 2


def test_activations_follow_resolution_batch_and_checkpointing():
    def activations(**overrides):
        config = TrainConfig(dtype="bf16", **{k: v for k, v in overrides.items() if k == "gradient_checkpointing"})
        config.data.batch_size = overrides.get("batch", 1)
        plan = plan_memory(config, overrides.get("resolution", 512), transformer_config=XL2_TRANSFORMER_CONFIG)
        return next(size for name, size in plan.rows if name.startswith("activations"))

    plain = activations(gradient_checkpointing=False)
    assert activations(gradient_checkpointing=False, batch=2) == pytest.approx(2 * plain, rel=0.01)
    assert activations(gradient_checkpointing=False, resolution=1024) > 3.5 * plain  # 4x tokens, attention grows faster
    assert activations(gradient_checkpointing=True) < 0.2 * plain


@pytest.mark.parametrize("recipe", GPU_RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_shipped_gpu_recipes_fit_their_budget(recipe):
    config = load_train_config(recipe)
    assert config.memory_budget_gb <= 24
    plan = plan_memory(config, config.resolution)
    assert plan.fits, plan.table()
    assert plan.total_gib > 1.14  # at least the bf16 base weights


def test_plan_cli_prints_the_table_and_fails_an_impossible_budget(capsys):
    recipe = str(REPO / "recipes" / "style_lora_1024_24gb.yaml")
    assert cli([recipe]) == 0
    out = capsys.readouterr().out
    assert "predicted peak" in out and "budget 24 GiB: fits" in out and "610.9 M parameters" in out
    assert cli([recipe, "data.batch_size=2", "--budget-gb", "1"]) == 3
    assert "does NOT fit" in capsys.readouterr().out


def test_validation_prompts_add_a_start_up_peak_for_t5():
    """T5-XXL (4.76 B parameters) loads alone in bf16 before training when there are validation prompts."""
    with_prompts = plan_memory(load_train_config(REPO / "recipes" / "style_lora_1024_24gb.yaml"), 1024)
    assert with_prompts.startup is not None and with_prompts.startup[1] / 2**30 == pytest.approx(4.762e9 * 2 / 2**30 + 1.0, rel=0.01)
    assert with_prompts.peak_gib == pytest.approx(with_prompts.startup[1] / 2**30)
    assert "T5 in bf16 for the validation prompts" in with_prompts.table()
    without = plan_memory(load_train_config(REPO / "recipes" / "lowmem_lora_1024_8gb.yaml"), 1024)
    assert without.startup is None and without.peak_gib == without.total_gib
    assert not plan_memory(load_train_config(REPO / "recipes" / "style_lora_1024_24gb.yaml"), 1024, budget_gib=8).fits
