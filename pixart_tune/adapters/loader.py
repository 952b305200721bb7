"""Load PixArt-Sigma LoRAs of any layout onto a transformer, several at once.

``read_lora`` turns a path (a PEFT adapter folder or one ``.safetensors`` file in
any layout of :mod:`pixart_tune.adapters.layouts`) into canonical
:class:`~pixart_tune.adapters.layouts.LoraWeights`; ``check_fits`` refuses weights
made for another base with a message naming what does not match; ``apply_lora``
injects them through PEFT under an adapter name; ``load_adapters`` does all of it
for a list of (path, scale) specs and activates exactly those.

Only safetensors is read by default. Pickle-based files (``.bin``, ``.pt``,
``.ckpt``) can execute arbitrary code when loaded, so they are refused unless the
caller passes ``allow_pickle=True`` (the CLI's ``--allow-pickle-runs-code``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from pathlib import Path
from typing import Sequence

import torch
from peft import LoraConfig
from peft.functional import cast_adapter_dtype, inject_adapter_in_model, set_peft_model_state_dict
from safetensors import safe_open

from pixart_tune.adapters import lora
from pixart_tune.adapters.layouts import PREFIXES, LoraWeights, from_peft_state, from_state_dict, pixart_module_names
from pixart_tune.base import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from pixart_tune.errors import UserError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

@dataclasses.dataclass
class AdapterSpec:
    """One adapter to apply, and how strongly."""

    path: str
    """Adapter folder or .safetensors file, in any supported layout."""
    scale: float = 1.0
    """Strength: 1.0 as trained, 0 off, negative to push away from it."""

    def __post_init__(self) -> None:
        self.path = str(self.path)
        self.scale = float(self.scale)


def parse_spec(text: str) -> AdapterSpec:
    """``PATH`` or ``PATH:SCALE`` (the scale after the last colon, when it is a number)."""
    path, sep, scale = text.rpartition(":")
    if sep and path:
        try:
            return AdapterSpec(path, float(scale))
        except ValueError:
            pass
    return AdapterSpec(text)


# --- reading -------------------------------------------------------------------------


def read_lora(path: str | Path, allow_pickle: bool = False) -> LoraWeights:
    """Canonical weights of the LoRA at ``path`` (folder or file, any supported layout)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"adapter {path} does not exist; pass an adapter folder or a .safetensors file")
    if path.is_dir():
        return _read_folder(path, allow_pickle)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return _read_pickle(path, allow_pickle)
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"{path}: unsupported adapter file type {path.suffix!r}; use a .safetensors file or an adapter folder")
    if path.name == ADAPTER_WEIGHTS and (path.parent / ADAPTER_CONFIG).is_file():
        # The weights of a PEFT folder: its config holds what scales them (rsLoRA, patterns).
        return _read_folder(path.parent, allow_pickle)
    state, metadata = _read_safetensors(path)
    return _from_flat(state, metadata, _sidecar_alpha(path))


def _read_folder(path: Path, allow_pickle: bool) -> LoraWeights:
    config_file = path / ADAPTER_CONFIG
    weights = path / ADAPTER_WEIGHTS
    if config_file.is_file() and weights.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        state, metadata = _read_safetensors(weights)
        # PEFT's save_pretrained writes base_model.model.<module>; older PixArt scripts
        # unet.base_model.model.; diffusers-style tools transformer. The config
        # (rsLoRA, rank and alpha patterns) applies to the module names behind them.
        state = {_strip_prefix(key): tensor for key, tensor in state.items()}
        modules = from_peft_state(state, config)
        dora = {k.rsplit(".lora_magnitude_vector", 1)[0]: v for k, v in state.items() if "lora_magnitude_vector" in k}
        if not modules:
            raise UserError(f"{weights} holds no LoRA weights")
        return LoraWeights(modules, metadata, "peft", dora)
    if config_file.is_file() and (path / "adapter_model.bin").is_file():
        return _read_pickle(path / "adapter_model.bin", allow_pickle, config_file)
    files = sorted(path.glob("*.safetensors"))
    if len(files) == 1:
        return read_lora(files[0], allow_pickle)
    raise UserError(
        f"{path} is not an adapter folder: it needs {ADAPTER_WEIGHTS} + {ADAPTER_CONFIG}, or exactly one .safetensors file "
        f"(found {len(files)}); pass the file itself"
    )


# The prefixes a PEFT folder's keys carry, by the tool that saved it.
_PEFT_PREFIXES = tuple(PREFIXES[layout] for layout in ("peft-unet", "peft-model", "diffusers"))


def _strip_prefix(key: str) -> str:
    for prefix in _PEFT_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for a damaged header
        raise UserError(f"{path} is not a readable safetensors file ({error})") from error
    return state, metadata


def _read_pickle(path: Path, allow_pickle: bool, config_file: Path | None = None) -> LoraWeights:
    if not allow_pickle:
        raise UserError(
            f"{path} is a pickle file, and loading a pickle can run any code it contains; convert it to .safetensors, "
            "or pass --allow-pickle-runs-code (allow_pickle=True) if you trust where it came from"
        )
    state = torch.load(str(path), map_location="cpu", weights_only=False)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if config_file is not None:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        return LoraWeights(from_peft_state(state, config), {}, "peft")
    return _from_flat(state, {}, _sidecar_alpha(path))


def _from_flat(state: dict[str, torch.Tensor], metadata: dict[str, str], fallback_alpha: float | None) -> LoraWeights:
    blocks = [int(m.group(1)) for k in state for m in [re.search(r"(?:transformer_)?blocks[._](\d+)[._]", k)] if m]
    names = pixart_module_names(max(blocks, default=-1) + 1)
    if fallback_alpha is None and "lora_alpha" in metadata:
        fallback_alpha = float(metadata["lora_alpha"])
    return from_state_dict(state, names, fallback_alpha, metadata)


def _sidecar_alpha(path: Path) -> float | None:
    """Alpha from a JSON next to the file, as other PixArt tools write it."""
    for candidate in (path.with_suffix(".json"), path.with_name(f"{path.stem}.config.json"), path.with_name(ADAPTER_CONFIG)):
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                continue
            alpha = data.get("lora_alpha") or data.get("alpha")
            if alpha:
                return float(alpha)
    return None


# --- fitting and applying -------------------------------------------------------------


def check_fits(transformer: torch.nn.Module, weights: LoraWeights, source: str = "adapter") -> None:
    """Refuses weights that do not fit this transformer, naming the first mismatch."""
    layers = {name: module for name, module in _linear_layers(transformer)}
    missing = [name for name in weights.modules if name not in layers]
    if missing:
        blocks = sum(1 for name in layers if name.endswith("attn1.to_q"))
        raise UserError(
            f"{source}: {len(missing)} of {len(weights.modules)} LoRA modules have no layer in this model "
            f"(e.g. {missing[0]}; the model has {blocks} transformer blocks); it was made for a different base model"
        )
    for name, module in weights.modules.items():
        layer = layers[name]
        want = (layer.out_features, layer.in_features)
        have = (module.up.shape[0], module.down.shape[1])
        if want != have:
            raise UserError(
                f"{source}: LoRA for {name} maps {have[1]} -> {have[0]} features but this model's layer maps "
                f"{want[1]} -> {want[0]}; it was made for a different base model (another width)"
            )


def _linear_layers(transformer: torch.nn.Module):
    for name, module in transformer.named_modules():
        base = getattr(module, "base_layer", None)
        if isinstance(base, torch.nn.Linear):
            yield name, base
        elif isinstance(module, torch.nn.Linear) and not name.endswith(("lora_A", "lora_B")) and ".lora_" not in name and ".base_layer" not in name:
            yield name, module


def peft_config(weights: LoraWeights) -> LoraConfig:
    """A LoraConfig that reproduces each module's rank and alpha exactly."""
    rank = max(weights.ranks)
    return LoraConfig(
        r=rank,
        lora_alpha=float(rank),
        target_modules=sorted(weights.modules),
        # PEFT matches pattern keys as regexes on the end of the module name.
        rank_pattern={re.escape(n): m.rank for n, m in weights.modules.items()},
        alpha_pattern={re.escape(n): float(m.alpha) for n, m in weights.modules.items()},
        use_dora=bool(weights.dora_magnitudes),
        init_lora_weights=True,
    )


def apply_lora(transformer: torch.nn.Module, weights: LoraWeights, adapter_name: str, scale: float = 1.0, source: str = "adapter") -> None:
    """Injects ``weights`` into ``transformer`` as a new, frozen ``adapter_name`` (fp32 LoRA weights) at ``scale``."""
    check_fits(transformer, weights, source)
    with warnings.catch_warnings():
        # Several adapters in one model is the point here, not an accident.
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(peft_config(weights), transformer, adapter_name=adapter_name)
    # PEFT makes the LoRA layers in the base layer's dtype and device; upcast before
    # loading, or fp32 weights copied into bf16 layers would be rounded.
    cast_adapter_dtype(transformer, adapter_name=adapter_name)
    _load_state(transformer, weights, adapter_name, source)
    for parameter in transformer.parameters():
        parameter.requires_grad_(False)
    lora.set_scale(transformer, adapter_name, scale)


def mismatches(transformer: torch.nn.Module, weights: LoraWeights, adapter_name: str = "default") -> list[str]:
    """How ``weights`` differ from the adapter ``adapter_name`` already injected: targets, rank, scale, DoRA.

    Empty when :func:`load_into` can load them exactly. A training run's own LoRA
    (resumed, or started from a stage-1 adapter) must be the same shape as the file.
    """
    layers = {name: layer for name, layer in lora.lora_layers(transformer).items() if adapter_name in layer.lora_A}
    problems = []
    outside = sorted(set(weights.modules) - set(layers))
    lacking = sorted(set(layers) - set(weights.modules))
    if outside:
        problems.append(f"targets: {len(outside)} of its modules are not targeted here (e.g. {outside[0]})")
    if lacking:
        problems.append(f"targets: {len(lacking)} targeted modules are not in it (e.g. {lacking[0]})")
    shared = [name for name in weights.modules if name in layers]
    for have, want in sorted({(weights.modules[n].rank, layers[n].r[adapter_name]) for n in shared}):
        if have != want:
            problems.append(f"rank={have} (recipe: {want})")
    for have, want in sorted({(weights.modules[n].scale, layers[n].scaling[adapter_name]) for n in shared}):
        if not math.isclose(have, want, rel_tol=1e-6):
            problems.append(f"alpha/rank scale={have:g} (recipe: {want:g})")
    dora_here = any(layers[n].use_dora.get(adapter_name, False) for n in shared)
    if bool(weights.dora_magnitudes) != dora_here:
        problems.append(f"dora={bool(weights.dora_magnitudes)} (recipe: {dora_here})")
    return list(dict.fromkeys(problems))


def load_into(
    transformer: torch.nn.Module,
    weights: LoraWeights,
    adapter_name: str = "default",
    source: str = "adapter",
    target: str = "the LoRA it is loaded into",
    advice: str = "",
) -> None:
    """Loads ``weights`` into the adapter ``adapter_name`` already injected, exactly and strictly.

    For a training run's own LoRA (resume, ``init_adapter``): the layers, their
    dtype and which parameters train stay as they are; only the values change. A
    mismatch is refused as "``source`` does not match ``target``: what differs; ``advice``".
    """
    check_fits(transformer, weights, source)
    problems = mismatches(transformer, weights, adapter_name)
    if problems:
        raise UserError(f"{source} does not match {target}: {'; '.join(problems)}" + (f"; {advice}" if advice else ""))
    _load_state(transformer, weights, adapter_name, source)


def _load_state(transformer: torch.nn.Module, weights: LoraWeights, adapter_name: str, source: str) -> None:
    """``weights`` as PEFT keys into the injected ``adapter_name``; keys matching no layer are refused."""
    state = {}
    for name, module in weights.modules.items():
        state[f"{name}.lora_A.weight"] = module.down.float()
        state[f"{name}.lora_B.weight"] = module.up.float()
    for name, magnitude in weights.dora_magnitudes.items():
        state[f"{name}.lora_magnitude_vector"] = magnitude.float()
    result = set_peft_model_state_dict(transformer, state, adapter_name=adapter_name)
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    if unexpected:
        raise UserError(f"{source}: LoRA weights match no layer of this model: {', '.join(unexpected[:3])}")


def load_adapters(
    transformer: torch.nn.Module, specs: Sequence[AdapterSpec], allow_pickle: bool = False, prefix: str = "adapter"
) -> list[str]:
    """Applies every spec with its own scale and activates exactly those; returns the adapter names."""
    names = []
    for index, spec in enumerate(specs):
        name = f"{prefix}_{index}"
        lora.remove(transformer, name)
        apply_lora(transformer, read_lora(spec.path, allow_pickle), name, spec.scale, source=spec.path)
        names.append(name)
    lora.activate(transformer, names)
    return names

