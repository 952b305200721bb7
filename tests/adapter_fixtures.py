"""Adapters with known weights on the tiny model, and a fixed transformer input to compare outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pixart_tune.adapters import lora
from pixart_tune.base import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from pixart_tune.models import load_transformer


def filled_transformer(model: str, settings: lora.LoraSettings, seed: int):
    """The tiny transformer with a LoRA whose A and B are seeded random values (B is zero at init)."""
    transformer = load_transformer(model)
    lora.inject_lora(transformer, settings)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if ".lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    transformer.eval()
    return transformer


def make_adapter(model: str, out: Path, seed: int, rank: int = 4, alpha: float = 8.0, targets: str = "attention_ff", metadata=None) -> Path:
    settings = lora.LoraSettings(rank=rank, alpha=alpha, targets=targets)
    transformer = filled_transformer(model, settings, seed)
    return lora.save_adapter(transformer, out, settings, metadata)


def peft_state(folder: Path) -> dict[str, torch.Tensor]:
    """The PEFT state dict an adapter folder holds, read as plain safetensors."""
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / ADAPTER_WEIGHTS))


def peft_load(transformer, folder: Path, adapter_name: str = "default", scale: float = 1.0):
    """Loads an adapter folder with PEFT's own code alone: the oracle the toolkit's loader is checked against.

    PEFT's LoraConfig.from_pretrained reads the config (rank and alpha patterns,
    rsLoRA, DoRA), inject_adapter_in_model builds the layers and
    set_peft_model_state_dict fills them; nothing of pixart-tune runs.
    """
    from peft import LoraConfig
    from peft.functional import inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    assert (Path(folder) / ADAPTER_CONFIG).is_file()
    inject_adapter_in_model(LoraConfig.from_pretrained(str(folder)), transformer, adapter_name=adapter_name)
    result = set_peft_model_state_dict(transformer, peft_state(folder), adapter_name=adapter_name)
    assert not [k for k in result.unexpected_keys if "lora_" in k], result.unexpected_keys
    for module in transformer.modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            module.set_scale(adapter_name, scale)
    return transformer


def model_inputs(transformer, seed: int = 0, size: int = 16) -> dict:
    generator = torch.Generator().manual_seed(seed)
    config = transformer.config
    return dict(
        hidden_states=torch.randn(2, config.in_channels, size, size, generator=generator),
        encoder_hidden_states=torch.randn(2, 7, config.caption_channels, generator=generator),
        timestep=torch.tensor([10, 700]),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )


@torch.no_grad()
def output(transformer, seed: int = 0) -> torch.Tensor:
    return transformer(**model_inputs(transformer, seed), return_dict=False)[0]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, base: torch.Tensor | None = None, tol: float = 1e-4) -> None:
    """Equal within ``tol`` relative to the size of the outputs, and (with ``base``) really changed by the adapter."""
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    assert error <= tol * max(scale, 1.0), f"max abs difference {error:.3g} (outputs up to {scale:.3g})"
    if base is not None:
        assert (expected - base).abs().max().item() > 1e-2 * max(scale, 1.0), "the adapter does not change the output"


@pytest.fixture(scope="session")
def adapters(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """Three adapters of the tiny model: two of rank 4 and one of rank 2 on fewer layers."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": make_adapter(tiny_model, root / "a", seed=1, metadata={"trigger_words": ["sks"], "steps": 100, "learning_rate": 1e-4}),
        "b": make_adapter(tiny_model, root / "b", seed=2, alpha=2.0),
        "c": make_adapter(tiny_model, root / "c", seed=3, rank=2, alpha=3.0, targets="attention"),
    }
