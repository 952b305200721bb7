"""PixArt-alpha in the same code: a tiny alpha pipeline (``init-tiny --family alpha``) through
prepare, train (its micro-conditions in the loss), validation and sample."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixart_tune.family import ALPHA
from pixart_tune.parts import resolve_parts
from tests.training_fixtures import RED, prepare, tiny_config, write_flat_images


@pytest.fixture(scope="module")
def alpha_model(tmp_path_factory) -> str:
    from pixart_tune.tiny import init_tiny

    return str(init_tiny(tmp_path_factory.mktemp("alpha") / "tiny-alpha", family="alpha"))


def test_the_tiny_alpha_pipeline_is_pixart_alpha(alpha_model):
    parts = resolve_parts(alpha_model)
    assert parts.family is ALPHA and parts.own_components
    assert json.loads((Path(alpha_model) / "model_index.json").read_text())["_class_name"] == "PixArtAlphaPipeline"
    config = json.loads((Path(alpha_model) / "transformer" / "config.json").read_text())
    assert ALPHA.takes_conditions(config), "the tiny alpha transformer takes resolution and aspect ratio, as the 1024 model"


def test_prepare_train_validate_and_sample_an_alpha_lora(alpha_model, tmp_path):
    from pixart_tune.sampling import SampleConfig, sample
    from pixart_tune.training.trainer import Trainer, run

    source = write_flat_images(tmp_path / "source", RED, [(256, 256), (192, 320)], "a flat red colour", shaded=True)
    data = prepare(alpha_model, source, tmp_path / "prepared")
    manifest = json.loads((data / "dataset.json").read_text())
    assert manifest["max_tokens"] == 120 and manifest["vae_scaling_factor"] == pytest.approx(0.18215)

    overrides = ["schedule.steps=3", "checkpoint.every=0", "validation.prompts=[a red cat]", "validation.every=3", "validation.steps=2"]
    config = tiny_config(alpha_model, data, tmp_path / "run", *overrides)
    trainer = Trainer(tiny_config(alpha_model, data, tmp_path / "look", *overrides), progress=False)
    trainer.setup()
    try:
        batch = trainer.next_batch()
        height, width = (side * 8 for side in batch.latents.shape[-2:])
        conditions = trainer.loss.conditions(height, width, len(batch), batch.latents.device, trainer.dtype)
        # What PixArtAlphaPipeline passes for an image of that size (pipeline_pixart_alpha.py).
        assert conditions["resolution"].tolist() == [[height, width]] * len(batch)
        assert torch.equal(conditions["aspect_ratio"], torch.full((len(batch), 1), height / width, dtype=trainer.dtype))
        assert type(trainer.validator.pipe).__name__ == "PixArtAlphaPipeline"
    finally:
        trainer.cleanup()
    adapter = run(config, progress=False)
    header = json.loads((adapter / "adapter_config.json").read_text())
    assert header["r"] > 0
    assert (tmp_path / "run" / "samples" / "step-000003.png").is_file()

    result = sample(SampleConfig(model=alpha_model, prompts=["a red cat"], seeds=[1], steps=2, adapters=[str(adapter)],
                                 out=str(tmp_path / "samples"), device="cpu"))
    base, adapted = (np.asarray(Image.open(path), dtype=np.int16) for path in result.images[:2])
    assert base.shape == adapted.shape and np.abs(base - adapted).mean() > 0, "the alpha LoRA changed nothing"


def test_the_micro_conditions_change_the_alpha_transformer_s_output(alpha_model):
    """Passed in training, they matter: the same input with another size gives another prediction."""
    from pixart_tune.models import load_transformer

    transformer = load_transformer(alpha_model)
    x, t = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    text, mask = torch.randn(1, 5, 32), torch.ones(1, 5)
    outputs = [
        transformer(x, encoder_hidden_states=text, encoder_attention_mask=mask, timestep=t,
                    added_cond_kwargs=ALPHA.micro_conditions(transformer.config, h, w, 1, "cpu", torch.float32)).sample
        for h, w in ((256, 256), (1024, 1024))
    ]
    assert not torch.equal(*outputs)
