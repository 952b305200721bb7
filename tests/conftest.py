"""Shared fixtures: the tiny PixArt-Sigma pipeline, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests never reach a network: every model comes from a local folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Path of a tiny PixArt-Sigma pipeline in the diffusers folder layout."""
    from pixart_tune.tiny import init_tiny

    return str(init_tiny(tmp_path_factory.mktemp("models") / "tiny"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
