"""The toolkit's vocabulary, below everything else: model facts, resolutions, dtypes, file names.

Every other module takes these from here instead of typing them again, so a
resolution, a dtype choice or a file name has one home.
"""

from __future__ import annotations

import torch

# --- the model ------------------------------------------------------------------------

REAL_MODEL_ID = "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"

# PixArt-Sigma reads 300 T5 tokens (PixArt-alpha read 120).
MAX_TOKENS = 300

# --- resolutions ----------------------------------------------------------------------

RESOLUTIONS = (256, 512, 1024, 2048)


def bucket_table(resolution: int) -> dict[str, list[float]]:
    """The aspect-ratio buckets PixArt generates at ``resolution``: ``{"h/w": [height, width]}``.

    diffusers' own tables (``ASPECT_RATIO_*_BIN`` beside the PixArt pipelines),
    imported, never copied, so training sees the very sizes the pipeline's
    resolution binning produces. Imported on first use: the pipeline modules pull
    in T5's model code, which a training process never needs.
    """
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
        ASPECT_RATIO_256_BIN,
        ASPECT_RATIO_512_BIN,
        ASPECT_RATIO_1024_BIN,
    )
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN

    tables = {256: ASPECT_RATIO_256_BIN, 512: ASPECT_RATIO_512_BIN, 1024: ASPECT_RATIO_1024_BIN, 2048: ASPECT_RATIO_2048_BIN}
    try:
        return tables[resolution]
    except KeyError:
        raise ValueError(f"resolution must be one of {', '.join(map(str, RESOLUTIONS))}, got {resolution}") from None


# Checkpoint resolution -> the positional-embedding interpolation scale the
# official conversion uses.
INTERPOLATION_SCALE = {256: 0.5, 512: 1, 1024: 2, 2048: 4}

# The VAE downsamples 8x: a transformer of sample_size S (latent side) works at 8 S px.
VAE_SCALE = 8


def resolution_of(sample_size: int) -> int:
    """The resolution a transformer of ``sample_size`` (its latent side) was trained at."""
    return VAE_SCALE * int(sample_size)


# --- dtypes ---------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None


def auto_dtype(device: torch.device | str) -> torch.dtype:
    """What "auto" means for weights on ``device``: bf16 on CUDA (half the memory), fp32 on a CPU (slow bf16 matmuls there)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def dtype_for(name: str, device: torch.device | str) -> torch.dtype:
    """A dtype choice (``auto`` or one of :data:`DTYPES`) on ``device``."""
    return auto_dtype(device) if name == "auto" else resolve_dtype(name)


# --- file names -----------------------------------------------------------------------

# A prepared dataset (pixart-tune prepare).
MANIFEST = "dataset.json"
REPORT = "report.json"
SCAN_INDEX = "scan_index.json"

# An adapter folder (PEFT layout).
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

# A training run's output_dir.
RUN_CONFIG = "config.yaml"
ADAPTER_DIR = "adapter"
CHECKPOINTS = "checkpoints"
SAMPLES = "samples"
BASE_GRID = "base.png"
LOSS_HISTORY = "loss.json"
LOSS_PLOT = "loss.png"
