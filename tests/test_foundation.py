"""The project's layout, the typed config loader, the CLI and the tiny model."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from pixart_tune.config import ConfigError, apply_overrides, from_dict, load_config
from tests.conftest import REPO


def test_datasets_folder_never_shadows_hugging_face_datasets():
    assert not (REPO / "datasets" / "__init__.py").exists()
    result = subprocess.run(
        [sys.executable, "-c", "import datasets; print(datasets.load_dataset.__module__)"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )
    assert result.stdout.strip().startswith("datasets.")


def test_top_level_layout():
    for name in ("pyproject.toml", "README.md", "pixart_tune", "recipes", "datasets", "tests", "app.py"):
        assert (REPO / name).exists(), name


@dataclasses.dataclass
class Inner:
    rate: float = 1.0
    """A learning rate."""
    names: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if self.rate <= 0:
            raise ValueError("rate must be positive")


@dataclasses.dataclass
class Outer:
    steps: int = 10
    mode: str = "a"
    flag: bool = False
    maybe: int | None = None
    inner: Inner = dataclasses.field(default_factory=Inner)


def test_config_overrides_merge_and_types_are_checked(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 5\ninner:\n  rate: 2\n")
    config = load_config(Outer, path, ["inner.names=[x, y]", "flag=true", "maybe=3"])
    assert config == Outer(steps=5, flag=True, maybe=3, inner=Inner(rate=2.0, names=["x", "y"]))
    assert isinstance(config.inner.rate, float)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"stpes": 1}, "unknown key 'stpes'"),
        ({"inner": {"rat": 1}}, "unknown key 'inner.rat'"),
        ({"steps": "many"}, "steps: expected an integer"),
        ({"flag": "yes"}, "flag: expected true or false"),
        ({"inner": {"rate": -1}}, "rate must be positive"),
    ],
)
def test_config_errors_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Outer, data)


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["steps"])


def test_cli_lists_verbs():
    result = subprocess.run([sys.executable, "-m", "pixart_tune.cli", "--help"], capture_output=True, text=True, check=True)
    for verb in ("init-tiny", "class-images", "prepare", "train", "plan", "sample", "merge", "export", "app"):
        assert verb in result.stdout


def test_tiny_model_loads_through_from_pretrained(tiny_model):
    from diffusers import PixArtSigmaPipeline

    pipe = PixArtSigmaPipeline.from_pretrained(tiny_model)
    # The trap of transformers 5: a T5 tokenizer built from vocab_file= has 4 tokens.
    assert len(pipe.tokenizer) > 4
    assert "<unk>" not in pipe.tokenizer.tokenize("a photo of a cat")
    assert pipe.transformer.config.caption_channels == pipe.text_encoder.config.d_model
    assert pipe.vae.config.scaling_factor == pytest.approx(0.13025)


def test_init_tiny_refuses_a_non_empty_folder(tmp_path):
    from pixart_tune.tiny import init_tiny

    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        init_tiny(tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"
