"""Loading PixArt-Sigma components, and the real-size architecture on the meta device.

Everything loads through diffusers' and transformers' own ``from_pretrained`` with a
hub id or a local folder in the diffusers layout (``transformer/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``). The tiny pipeline the tests and
the demo use (:mod:`pixart_tune.tiny`) is saved in that same layout, so they
exercise exactly the code path of the real model.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from pixart_tune.parts import component_source, resolve_parts

logger = logging.getLogger(__name__)

# PixArt-Sigma XL-2 at 1024 px as the official diffusers conversion writes it.
# Used to instantiate the real architecture on the meta device (memory plans,
# benchmarks) without downloading weights. The "-MS" checkpoints have no
# resolution/aspect micro-conditions.
XL2_TRANSFORMER_CONFIG: dict[str, Any] = {
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 28,
    "cross_attention_dim": 1152,
    "attention_bias": True,
    "sample_size": 128,
    "patch_size": 2,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "interpolation_scale": 2,
    "use_additional_conditions": False,
    "caption_channels": 4096,
}

# T5 v1.1 XXL encoder, the text encoder of PixArt-Sigma (4.7B parameters).
T5_XXL_CONFIG: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "feed_forward_proj": "gated-gelu",
    "is_encoder_decoder": False,
}

def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_transformer(model: str, dtype: torch.dtype = torch.float32, **kwargs: Any):
    """The transformer of ``model``: its transformer/ folder, or the folder itself for a bare transformer."""
    from diffusers import PixArtTransformer2DModel

    subfolder = resolve_parts(model).transformer_subfolder
    return PixArtTransformer2DModel.from_pretrained(model, dtype=dtype, **({"subfolder": subfolder} if subfolder else {}), **kwargs)


def components(model: str, part: str) -> str:
    """Where ``model``'s ``part`` loads from (:func:`pixart_tune.parts.component_source`)."""
    return component_source(model, part)


def load_vae(model: str, dtype: torch.dtype = torch.float32):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(components(model, "vae"), subfolder="vae", dtype=dtype)


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(components(model, "tokenizer"), subfolder="tokenizer")


def text_encoder_in_8bit(load_in_8bit: bool, device: torch.device | str) -> bool:
    """Whether T5 really loads in 8-bit: bitsandbytes' int8 matmuls need the CUDA device it runs on."""
    return load_in_8bit and torch.device(device).type == "cuda" and torch.cuda.is_available()


def load_text_encoder(model: str, dtype: torch.dtype = torch.float32, load_in_8bit: bool = False, device: torch.device | str = "cpu"):
    """T5 encoder on ``device``; ``load_in_8bit`` (CUDA + bitsandbytes) roughly halves T5-XXL's 9.5 GB in bf16."""
    from transformers import T5EncoderModel

    device = torch.device(device)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if text_encoder_in_8bit(load_in_8bit, device):
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        # Placed by bitsandbytes on the very device the prompts go to (not the current one).
        kwargs["device_map"] = {"": device.index if device.index is not None else torch.cuda.current_device()}
        return T5EncoderModel.from_pretrained(components(model, "text_encoder"), subfolder="text_encoder", **kwargs)
    if load_in_8bit:
        logger.warning("8-bit T5 needs a CUDA device; loading the text encoder in %s on %s instead", dtype, device)
    return T5EncoderModel.from_pretrained(components(model, "text_encoder"), subfolder="text_encoder", **kwargs).to(device)


def quiet_loading() -> None:
    """No loading bars from transformers and diffusers: for runs asked to show no progress."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


def load_noise_scheduler(model: str):
    """The DDPM training schedule, built from the model folder's scheduler config."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(components(model, "scheduler"), subfolder="scheduler")


def pipeline_class(model: str):
    """The diffusers pipeline class of ``model``'s family (PixArtSigmaPipeline or PixArtAlphaPipeline)."""
    import diffusers

    return getattr(diffusers, resolve_parts(model).family.pipeline)


def load_pipeline(model: str, dtype: torch.dtype | None = torch.float32, transformer=None, **kwargs: Any):
    """The family's pipeline of ``model``, its transformer put together with its components.

    Pass ``transformer`` to reuse one already loaded, and other components (``vae``,
    ``text_encoder=None`` ...) as ``from_pretrained`` takes them.
    """
    parts = resolve_parts(model)
    if dtype is not None:  # None: each component in its saved dtype (a passed transformer keeps its own)
        kwargs["dtype"] = dtype
    if transformer is not None:
        kwargs["transformer"] = transformer
    elif not (parts.own_components and parts.transformer_subfolder):
        kwargs["transformer"] = load_transformer(model, dtype or torch.float32)
    return pipeline_class(model).from_pretrained(parts.components, **kwargs)


def meta_transformer(config: dict[str, Any] | None = None, dtype: torch.dtype | None = None):
    """The real-size XL-2 architecture on the meta device: shapes without memory."""
    from diffusers import PixArtTransformer2DModel

    with torch.device("meta"):
        model = PixArtTransformer2DModel.from_config(config or XL2_TRANSFORMER_CONFIG)
    if dtype is not None:
        # nn.Module.to, not ModelMixin.to: the latter warns about fp32-only modules
        # even when the model has none (diffusers checks the list for None, not empty).
        torch.nn.Module.to(model, dtype)
    return model
