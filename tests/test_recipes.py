"""Every shipped recipe under recipes/ (recursively) loads, validates and documents itself."""

from __future__ import annotations

import pytest

from pixart_tune.training.config import TrainConfig, load_train_config
from tests.conftest import REPO

RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))


def test_the_expected_recipes_ship():
    names = {p.relative_to(REPO / "recipes").as_posix() for p in RECIPES}
    assert {"tiny_cpu.yaml", "style_lora_1024_24gb.yaml", "subject_lora_1024_24gb.yaml", "lowmem_lora_1024_8gb.yaml",
            "lora_512_24gb.yaml", "lora_2048_24gb.yaml", "two_stage/stage1_concepts_512.yaml",
            "two_stage/stage2_detail_1024.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.relative_to(REPO / "recipes").as_posix())
def test_recipe_loads_and_has_a_header(recipe):
    config = load_train_config(recipe)
    assert isinstance(config, TrainConfig)
    assert config.resolution is not None and config.data.path is not None
    header = recipe.read_text(encoding="utf-8").split("\n\n")[0]
    for part in ("Purpose:", "Command:", "pixart-tune train", "Memory:"):
        assert part in header, f"{recipe.name} header lacks {part!r}"


def test_two_stage_recipes_continue_one_adapter():
    stage1 = load_train_config(REPO / "recipes" / "two_stage" / "stage1_concepts_512.yaml")
    stage2 = load_train_config(REPO / "recipes" / "two_stage" / "stage2_detail_1024.yaml")
    assert stage2.init_adapter == stage1.output_dir / "adapter"
    assert stage1.lora == stage2.lora and stage1.model == stage2.model
    assert (stage1.resolution, stage2.resolution) == (512, 1024)


def test_every_recipe_key_is_documented():
    """docs/training.md lists every key of the typed config, so none is only discoverable in the code."""
    import dataclasses

    from pixart_tune.training.config import TrainConfig

    def keys(config, prefix=""):
        for field in dataclasses.fields(config):
            value = getattr(config, field.name)
            if dataclasses.is_dataclass(value):
                yield from keys(value, f"{prefix}{field.name}.")
            else:
                yield f"{prefix}{field.name}"

    text = (REPO / "docs" / "training.md").read_text(encoding="utf-8")
    missing = [key for key in keys(TrainConfig()) if f"| `{key}` |" not in text]
    assert not missing, f"keys missing from docs/training.md's key table: {missing}"
