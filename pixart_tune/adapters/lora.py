"""LoRA for PixArt-Sigma through PEFT: inject a trainable one, save it, switch and scale adapters.

diffusers has no LoRA support for ``PixArtTransformer2DModel`` (no ``add_adapter``,
no ``load_lora_weights`` on the pipeline), so this module owns that path, using
PEFT's public functional API on the plain diffusers model. Reading an adapter back
(any layout, this one included) is :mod:`pixart_tune.adapters.loader`'s job.

The on-disk format is PEFT's: ``adapter_model.safetensors`` (keys such as
``transformer_blocks.0.attn1.to_q.lora_A.weight``, or ``...to_q.lokr_w1`` for a LoKr)
+ ``adapter_config.json``, with training metadata as strings in the safetensors header.

Besides LoRA, ``LoraSettings.type`` trains PEFT's LyCORIS adapters, LoKr and LoHa; the
helpers here (``lora_layers``, ``set_scale``, ``activate``, ``remove``) treat their
layers (PEFT's ``LycorisLayer``) exactly like LoRA layers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any, Iterator

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig
from peft.functional import (
    cast_adapter_dtype,
    delete_adapter,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_adapter,
)
from peft.tuners.lora import LoraLayer
from peft.tuners.lycoris_utils import LycorisLayer
from safetensors.torch import save_file

from pixart_tune.base import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from pixart_tune.errors import UserError
from pixart_tune.fsutil import atomic_path

_BLOCK = r"transformer_blocks\.\d+"
_ATTENTION = rf"{_BLOCK}\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"
_FEED_FORWARD = rf"{_BLOCK}\.ff\.net\.(0\.proj|2)"
_OUTSIDE_BLOCKS = r"proj_out|adaln_single\.(linear|emb\.timestep_embedder\.linear_[12])|caption_projection\.linear_[12]"

# PEFT matches a string ``target_modules`` as a full-name regex.
TARGET_PRESETS: dict[str, str] = {
    "attention": _ATTENTION,
    "attention_ff": rf"{_ATTENTION}|{_FEED_FORWARD}",
    "all_linear": rf"{_ATTENTION}|{_FEED_FORWARD}|{_BLOCK}\.attn1\.to_out\.0|{_OUTSIDE_BLOCKS}",
}


ADAPTER_TYPES = ("lora", "loha", "lokr")
PEFT_TYPES = {"lora": "LORA", "loha": "LOHA", "lokr": "LOKR"}
AdapterLayer = LoraLayer | LycorisLayer


@dataclasses.dataclass
class LoraSettings:
    type: str = "lora"
    """lora, loha (Hadamard product of two rank-r products) or lokr (Kronecker product), through PEFT's
    LoraConfig / LoHaConfig / LoKrConfig. rank, alpha and targets apply to all three; dropout, rslora and
    dora to lora only; factor to lokr only."""
    rank: int = 16
    """Rank r (LoKr: of its decomposed half; a half whose sides are at most 2 r stays a full matrix)."""
    alpha: float = 16.0
    """Alpha; the update is scaled by alpha / r (alpha / sqrt(r) with rslora)."""
    dropout: float = 0.0
    """Dropout on the LoRA branch's input while training (0 = none; lora only)."""
    targets: str = "attention"
    """A preset (attention, attention_ff, all_linear) or a regex over module names."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r) (lora only)."""
    dora: bool = False
    """Weight-decomposed LoRA (DoRA); slower, sometimes better for subjects (lora only)."""
    factor: int = -1
    """LoKr: the size of the first Kronecker factor (PEFT's decompose_factor; -1 splits each side
    near its square root, as LyCORIS does by default)."""

    def __post_init__(self) -> None:
        if self.type not in ADAPTER_TYPES:
            raise ValueError(f"type must be one of {', '.join(ADAPTER_TYPES)}, got {self.type!r}")
        if self.rank < 1:
            raise ValueError(f"rank must be at least 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.type != "lora":
            used = [name for name, on in (("dropout", self.dropout), ("rslora", self.rslora), ("dora", self.dora)) if on]
            if used:
                raise ValueError(f"{', '.join(used)} apply to type lora only, not {self.type}")
        if self.type != "lokr" and self.factor != -1:
            raise ValueError(f"factor applies to type lokr only, not {self.type}")
        if self.factor == 0 or self.factor < -1:
            raise ValueError(f"factor must be -1 or a positive size, got {self.factor}")

    @property
    def target_regex(self) -> str:
        return TARGET_PRESETS.get(self.targets, self.targets)

    def peft_config(self) -> LoraConfig | LoHaConfig | LoKrConfig:
        if self.type == "loha":
            return LoHaConfig(r=self.rank, alpha=self.alpha, target_modules=self.target_regex, init_weights=True)
        if self.type == "lokr":
            return LoKrConfig(
                r=self.rank, alpha=self.alpha, target_modules=self.target_regex, decompose_factor=self.factor, init_weights=True
            )
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_regex,
            use_rslora=self.rslora,
            use_dora=self.dora,
            init_lora_weights=True,
        )


def inject_lora(transformer: torch.nn.Module, settings: LoraSettings, adapter_name: str = "default") -> torch.nn.Module:
    """Adds a trainable LoRA to ``transformer``; the base weights are frozen.

    LoRA weights are kept in fp32 whatever the base dtype: the official PixArt LoRA
    guidance, and bf16 LoRA updates lose the small steps LoRA learning rates make.
    """
    for parameter in transformer.parameters():
        parameter.requires_grad_(False)
    inject_adapter_in_model(settings.peft_config(), transformer, adapter_name=adapter_name)
    if not lora_layers(transformer):
        raise UserError(f"LoRA targets {settings.targets!r} match no layer of this transformer")
    cast_adapter_dtype(transformer, adapter_name=adapter_name)
    for name, parameter in transformer.named_parameters():
        if f".{adapter_name}." in name or name.endswith(f".{adapter_name}"):
            parameter.requires_grad_(True)
    return transformer


def lora_layers(transformer: torch.nn.Module) -> dict[str, AdapterLayer]:
    """PEFT's LoRA and LyCORIS (LoKr, LoHa) layers of ``transformer``, by module name."""
    return {name: m for name, m in transformer.named_modules() if isinstance(m, (LoraLayer, LycorisLayer))}


def has_adapter(layer: AdapterLayer, adapter_name: str) -> bool:
    """Whether ``layer`` holds weights of ``adapter_name`` (a LoRA's lora_A, a LoKr's or LoHa's factors)."""
    return adapter_name in (layer.lora_A if isinstance(layer, LoraLayer) else layer._available_adapters)


def trainable_parameters(transformer: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in transformer.parameters() if p.requires_grad]


def adapter_state_dict(transformer: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """PEFT-layout LoRA weights (adapter name stripped from the keys)."""
    return get_peft_model_state_dict(transformer, adapter_name=adapter_name)


def save_adapter(
    transformer: torch.nn.Module,
    out: str | Path,
    settings: LoraSettings,
    metadata: dict[str, Any] | None = None,
    adapter_name: str = "default",
) -> Path:
    """Writes ``out/`` atomically: weights with metadata in the header, and the PEFT config."""
    state = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in adapter_state_dict(transformer, adapter_name).items()}
    return write_adapter(out, state, settings, metadata)


def write_adapter(
    out: str | Path, state: dict[str, torch.Tensor], settings: LoraSettings, metadata: dict[str, Any] | None = None
) -> Path:
    """Writes a PEFT adapter folder from a state dict (alpha always stored)."""
    header = {"format": "pt", "lora_rank": str(settings.rank), "lora_alpha": str(settings.alpha)}
    header["lora_targets"] = settings.targets
    if settings.type != "lora":
        header["lora_type"] = settings.type
    for key, value in (metadata or {}).items():
        header[key] = value if isinstance(value, str) else json.dumps(value)
    config = settings.peft_config().to_dict()
    config["target_modules"] = settings.target_regex
    config["peft_type"] = PEFT_TYPES[settings.type]
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata=header)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(_jsonable(config), indent=2), encoding="utf-8")
    return out


def peft_alpha(config: dict, name: str, rank: int) -> float:
    """The alpha that gives module ``name`` (rank ``rank``) the scale PEFT gives it under LoraConfig fields ``config``.

    r and lora_alpha default as LoraConfig's do; ``rank_pattern`` / ``alpha_pattern``
    override them per module (a regex on the end of the name, PEFT's
    ``get_pattern_key``); rsLoRA's alpha / sqrt(r) is re-expressed against alpha / rank.
    """
    defaults = LoraConfig.__dataclass_fields__
    r = float(_pattern_value(config.get("rank_pattern") or {}, name, config.get("r", defaults["r"].default)))
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", defaults["lora_alpha"].default)))
    return (alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r) * rank


def _pattern_value(patterns: dict, name: str, default: float) -> float:
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def set_scale(transformer: torch.nn.Module, adapter_name: str, scale: float) -> None:
    """Sets the strength of one adapter (1.0 = as trained)."""
    for layer in lora_layers(transformer).values():
        if has_adapter(layer, adapter_name):
            layer.set_scale(adapter_name, scale)


def activate(transformer: torch.nn.Module, adapter_names: list[str]) -> None:
    """Makes exactly these adapters active (an empty list runs the base model)."""
    layers = lora_layers(transformer)
    if not adapter_names:
        for layer in layers.values():
            layer.enable_adapters(False)
        return
    for layer in layers.values():
        layer.enable_adapters(True)
    set_adapter(transformer, adapter_names)
    for parameter in transformer.parameters():
        parameter.requires_grad_(False)


@contextlib.contextmanager
def disabled_adapters(transformer: torch.nn.Module) -> Iterator[None]:
    """Runs the base model inside the block, then restores the adapters exactly.

    PEFT's switch clears ``requires_grad`` of the LoRA weights on the way off and
    sets it again by its own rule (the active adapters' weights) on the way back; a
    training run must get back exactly the trainable set its optimizer holds, so
    the flags are restored as they were rather than left to that rule.
    """
    layers = list(lora_layers(transformer).values())
    flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    enabled = [not layer.disable_adapters for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer, on in zip(layers, enabled):
            layer.enable_adapters(on)
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def remove(transformer: torch.nn.Module, adapter_name: str) -> None:
    if any(has_adapter(layer, adapter_name) for layer in lora_layers(transformer).values()):
        delete_adapter(transformer, adapter_name=adapter_name, prefix="lora_")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
