"""``pixart-tune plan`` on the real-size PixArt-Sigma XL-2 architecture (meta device)."""

from __future__ import annotations

import json

import pytest

from pixart_tune.base import MANIFEST
from pixart_tune.commands.plan import main as cli
from pixart_tune.models import XL2_TRANSFORMER_CONFIG
from pixart_tune.training.config import TrainConfig, load_train_config
from pixart_tune.training.memory import CONTEXT_RESERVE_GIB, EMA_ROW, MASK_ROW, largest_bucket, plan_memory
from pixart_tune.training.optim import optimizer_advice
from tests.clip_fixtures import tiny_clip  # noqa: F401  (a fixture)
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
    assert not any(word in out for word in ("advice:", "note:", EMA_ROW, MASK_ROW, "CLIP scoring"))  # none applies
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


XL2_LORA = 28 * 8 * 16 * 2304
"""Rank-16 LoRA weights on the 8 attention projections (1152 -> 1152) of XL-2's 28 blocks."""


def _xl2_plan(*overrides: str, resolution: int = 512):
    config = load_train_config(None, ["dtype=bf16", f"resolution={resolution}", *overrides])
    return plan_memory(config, resolution, transformer_config=XL2_TRANSFORMER_CONFIG)


def test_ema_adds_its_fp32_shadow_and_optimizers_their_state():
    plain = _xl2_plan()
    ema = _xl2_plan("ema.enabled=true")
    assert _rows(ema)[EMA_ROW] == XL2_LORA * 4 and EMA_ROW not in _rows(plain)
    assert ema.total_bytes - plain.total_bytes == XL2_LORA * 4
    # STATE_BYTES_PER_PARAM: Prodigy 16 bytes a weight, schedule-free AdamW 8, adamw8bit 2.
    assert _xl2_plan("optim.name=prodigy", "optim.lr=1.0").total_bytes - plain.total_bytes == 14 * XL2_LORA
    assert _xl2_plan("optim.name=adamw_schedulefree").total_bytes - plain.total_bytes == 6 * XL2_LORA
    assert _rows(_xl2_plan("optim.name=prodigy", "optim.lr=1.0"))["optimizer state (prodigy)"] == 16 * XL2_LORA


def _write_dataset(folder, masked: int, unmasked: int = 1):
    """A dataset.json as prepare writes it (no latents: the plan reads only the manifest)."""
    from pixart_tune.data.cache import CacheItem, Manifest

    items = [CacheItem(f"{i}.png", ("a cat",), (512, 512), f"l{i}", (f"t{i}",), mask_key=f"m{i}" if i < masked else None)
             for i in range(masked + unmasked)]
    manifest = Manifest("tiny", 512, 4, 4096, 300, 0.13025, "empty", items)
    folder.mkdir(parents=True)
    (folder / MANIFEST).write_text(json.dumps(manifest.to_json()), encoding="utf-8")
    return folder


def test_loss_masks_count_when_a_prepared_dataset_has_them(tmp_path):
    masked = _write_dataset(tmp_path / "masked", masked=2)
    assert '"mask_key"' in (masked / MANIFEST).read_text(encoding="utf-8")
    plan = _xl2_plan(f"data.path={masked}", "data.batch_size=3")
    height, width = largest_bucket(512)
    assert _rows(plan)[MASK_ROW] == 3 * 1 * (height // 8) * (width // 8) * 4  # fp32 [1, h/8, w/8] per sample
    for path in (_write_dataset(tmp_path / "plain", masked=0), tmp_path / "not-prepared-yet"):
        assert MASK_ROW not in _rows(_xl2_plan(f"data.path={path}", "data.batch_size=3"))
    # A masked extra dataset makes masked batches too.
    extra = _xl2_plan(f"data.path={tmp_path / 'plain'}", f"data.extra=[{{path: {masked}}}]")
    assert _rows(extra)[MASK_ROW] == (height // 8) * (width // 8) * 4


def test_clip_scoring_is_a_validation_peak_of_its_own(tiny_clip):  # noqa: F811
    from transformers import CLIPModel

    params = sum(p.numel() for p in CLIPModel.from_pretrained(tiny_clip).parameters())
    prompts = ["validation.prompts=[a red cat]", "validation.base=false"]
    plain = _xl2_plan(*prompts)
    scored = _xl2_plan(*prompts, f"validation.clip_model={tiny_clip}", "ema.enabled=true")
    assert plain.validation is None and scored.notes == []
    rows = _rows(scored)
    # During scoring: base weights, LoRA weights, optimizer state, the EMA shadow and the
    # raw copy LoraEma.applied keeps, CLIP in bf16 and the CUDA context; no gradients.
    resident = rows["base weights (bf16)"] + rows["LoRA weights (fp32)"] + rows["optimizer state (adamw8bit)"] + 2 * rows[EMA_ROW]
    assert scored.validation[1] == resident + params * 2 + CONTEXT_RESERVE_GIB * 2**30
    assert f"CLIP ({params / 1e6:.1f} M parameters)" in scored.table() and "validation, CLIP scoring" in scored.table()
    assert scored.total_bytes == plain.total_bytes + XL2_LORA * 4  # CLIP stays out of the training peak
    absent = _xl2_plan(*prompts, "validation.clip_model=nobody/no-such-clip")
    assert absent.validation is None and "the CLIP model's size is not counted" in absent.table()
    assert _xl2_plan("validation.clip_model=nobody/no-such-clip").notes == []  # no prompts: no validation, no CLIP


def test_plan_cli_prints_new_items_and_optimizer_advice(capsys):
    recipe = str(REPO / "recipes" / "style_lora_1024_24gb_prodigy.yaml")
    assert cli([recipe, "optim.lr=1e-4", "ema.enabled=true", "validation.clip_model=nobody/no-such-clip"]) == 0
    out = capsys.readouterr().out
    assert EMA_ROW in out and "the CLIP model's size is not counted" in out
    advice = optimizer_advice(load_train_config(recipe, ["optim.lr=1e-4"]).optim, "constant_with_warmup")
    assert advice and all(f"advice: {line}" in out for line in advice)
