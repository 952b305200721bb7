"""The PixArt model families: what differs between PixArt-Sigma and PixArt-alpha around one DiT.

Both families share the transformer (``PixArtTransformer2DModel``), the DDPM
training schedule and the LoRA layouts. They differ in what surrounds it:

============  ==========================  ======================================
              PixArt-Sigma                PixArt-alpha
============  ==========================  ======================================
pipeline      ``PixArtSigmaPipeline``     ``PixArtAlphaPipeline``
T5 tokens     300                         120
VAE           SDXL VAE (scaling 0.13025)  SD VAE ``sd-vae-ft-ema`` (0.18215)
conditions    none                        resolution + aspect ratio on the 1024
                                          model (``use_additional_conditions``)
components    ``pixart_sigma_sdxlvae_``   ``PixArt-XL-2-1024-MS``
of a bare     ``T5_diffusers``
transformer
============  ==========================  ======================================

A :class:`Family` holds those facts and the one piece of behaviour they imply:
the micro-conditions a transformer is given, exactly as the family's pipeline
gives them at inference (``pipeline_pixart_alpha.py``: resolution ``[B, 2]`` in
pixels and aspect ratio ``[B, 1]`` = height / width, when the transformer takes
them). A third family (Sana: Gemma, DC-AE, flow matching) would add an entry
here and its own loss; the trainer loop asks the family, never a constant.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    pipeline: str
    """The diffusers pipeline class that runs the family at inference."""
    max_tokens: int
    """T5 tokens its pipeline encodes (and prepare caches)."""
    vae_scaling_factor: float
    """The scaling factor of the family's VAE (detection and a check on prepared data)."""
    components: str
    """Hub id of the family's VAE, T5, tokenizer and scheduler, for a model published as a transformer alone."""

    def takes_conditions(self, transformer_config: Any) -> bool:
        """Whether the transformer embeds resolution and aspect ratio (PixArt-alpha's 1024 model)."""
        value = _get(transformer_config, "use_additional_conditions")
        if value is None:  # diffusers' default when the config leaves it out (the alpha configs do)
            value = _get(transformer_config, "sample_size") == 128
        return bool(value)

    def micro_conditions(self, transformer_config: Any, height: int, width: int, batch: int, device, dtype) -> dict[str, torch.Tensor | None]:
        """``added_cond_kwargs`` for ``batch`` samples of ``height`` x ``width`` pixels, as the pipeline passes them."""
        if not self.takes_conditions(transformer_config):
            return {"resolution": None, "aspect_ratio": None}
        resolution = torch.tensor([height, width], device=device, dtype=dtype).repeat(batch, 1)
        aspect_ratio = torch.tensor([float(height / width)], device=device, dtype=dtype).repeat(batch, 1)
        return {"resolution": resolution, "aspect_ratio": aspect_ratio}


SIGMA = Family("sigma", "PixArtSigmaPipeline", 300, 0.13025, "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers")
ALPHA = Family("alpha", "PixArtAlphaPipeline", 120, 0.18215, "PixArt-alpha/PixArt-XL-2-1024-MS")
FAMILIES = {family.name: family for family in (SIGMA, ALPHA)}


def _get(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def family_named(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {name!r}") from None


def detect_family(model_index: dict | None, vae_config: dict | None, transformer_config: dict | None, name: str = "") -> Family:
    """The family of a model from what its folder says, most reliable first.

    1. The VAE's scaling factor: the SD VAE (0.18215) is alpha's, the SDXL VAE Sigma's.
    2. ``model_index.json`` naming ``PixArtSigmaPipeline``. ``PixArtAlphaPipeline``
       proves nothing: the Sigma component repository carries that name too.
    3. A transformer that takes micro-conditions is alpha's 1024 model (no Sigma
       checkpoint has them).
    4. Otherwise the name: "alpha" or "PixArt-XL-2" in it means alpha; Sigma is the default.
    """
    scale = (vae_config or {}).get("scaling_factor")
    if scale is not None:
        return min(FAMILIES.values(), key=lambda family: abs(family.vae_scaling_factor - float(scale)))
    if (model_index or {}).get("_class_name") == SIGMA.pipeline:
        return SIGMA
    if transformer_config is not None:
        if transformer_config.get("use_additional_conditions") is True:
            return ALPHA
        if "use_additional_conditions" not in transformer_config and "interpolation_scale" not in transformer_config:
            return ALPHA  # the published alpha configs leave out both keys; every Sigma config writes them
    lowered = name.lower()
    return ALPHA if "pixart-xl-2" in lowered or "alpha-dmd" in lowered or "pixart-lcm" in lowered else SIGMA


def read_json(path: Path) -> dict | None:
    """A JSON file's object, or None where there is none (or it is not JSON)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
