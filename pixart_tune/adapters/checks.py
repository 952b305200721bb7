"""Checks on what enters through an adapter: finite weights and scales, sane configs, regular files.

Each check raises a :class:`UserError` of one line that names the file (or the
value) and what to do, so that a damaged or diverged adapter is refused where it is
read instead of drawing black images, or merging into NaN, further on.
"""

from __future__ import annotations

import dataclasses
import math
import re
import stat
from pathlib import Path
from typing import Any

import torch

from pixart_tune.errors import UserError
from pixart_tune.fsutil import file_kind


def finite_scale(scale: float, path: str) -> None:
    """Refuses a NaN or infinite adapter scale (``PATH:nan``, ``PATH:inf``)."""
    if not math.isfinite(scale):
        raise UserError(f"adapter {path}: the scale {scale} is not a finite number; write PATH:SCALE with a number such as 0.8")


def regular_file(path: Path) -> None:
    """Refuses a path that is not a regular file (a FIFO would block the read forever, a device never end)."""
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):
        raise UserError(f"{path} is {file_kind(mode)}; pass an adapter folder or a regular .safetensors file")


def _bad_tensor(tensor: torch.Tensor) -> str | None:
    """"NaN" or "infinite" for the first bad kind of value in ``tensor``; None when all are finite."""
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()):
        return None
    return "NaN" if bool(torch.isnan(tensor).any()) else "infinite"


def _values(module: Any) -> list[tuple[str, Any]]:
    """(field, value) of a LoRA or LyCORIS module's tensors and alpha."""
    return [(f.name, getattr(module, f.name)) for f in dataclasses.fields(module) if f.name == "alpha" or isinstance(getattr(module, f.name), torch.Tensor)]


def require_finite(weights: Any, path: str | Path, advice: str | None = None) -> None:
    """Refuses ``weights`` (:class:`~pixart_tune.adapters.layouts.LoraWeights`) holding NaN or infinite
    values, or an alpha of zero, naming the file (or what they are) and the first bad module."""
    advice = advice or "the file is damaged or its training diverged: use an earlier checkpoint, or train again with a lower learning rate"
    groups = [("", weights)] + ([("text encoder ", weights.text_encoder)] if weights.text_encoder is not None else [])
    for part, group in groups:
        modules = [*group.modules.items(), *group.lycoris.items()]
        for name, module in modules:
            for field, value in _values(module):
                if field == "alpha":
                    if value is not None and not (math.isfinite(float(value)) and float(value) != 0):
                        raise UserError(f"{path}: the {part}module {name} has alpha {float(value)}, which makes its update {'nothing' if float(value) == 0 else 'NaN'}; {advice}")
                    continue
                bad = _bad_tensor(value)
                if bad:
                    raise UserError(f"{path}: the {part}module {name} holds {bad} values (in {field}); {advice}")
        magnitudes = [*group.dora_magnitudes.items(), *((g.parts[0], g.magnitude) for g in group.dora_inputs)]
        for name, magnitude in magnitudes:
            bad = _bad_tensor(magnitude)
            if bad:
                raise UserError(f"{path}: the DoRA magnitude of the {part}module {name} holds {bad} values; {advice}")


def _positive(value: Any, whole: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) and value > 0 and (not whole or float(value).is_integer())


_FIXES = {
    "r": "set it to the rank the weights were trained with (a whole number, at least 1)",
    "lora_alpha": "set it to the training alpha (a positive number; alpha = r applies the update as stored)",
    "alpha": "set it to the training alpha (a positive number; alpha = r applies the update as stored)",
}


def lora_config(data: dict, where: str | Path) -> dict:
    """``data`` (LoraConfig / LoKrConfig / LoHaConfig fields from ``where``) once its numbers are checked.

    Only fields present are checked: r, lora_alpha and alpha, the rank and alpha
    patterns (objects of regex -> number), use_rslora. Returns ``data``.
    """
    for field, whole in (("r", True), ("lora_alpha", False), ("alpha", False)):
        if field in data and not _positive(data[field], whole):
            raise UserError(f"{where}: {field} is {data[field]!r}; {_FIXES[field]}")
    for field, whole in (("rank_pattern", True), ("alpha_pattern", False)):
        patterns = data.get(field)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise UserError(f"{where}: {field} must be an object of module-name regex -> number, not {type(patterns).__name__}; fix it or remove it")
        for pattern, value in patterns.items():
            try:
                re.compile(pattern)
            except re.error as error:
                raise UserError(f"{where}: {field} key {pattern!r} is not a valid regular expression ({error}); fix it or remove it") from None
            if not _positive(value, whole):
                raise UserError(f"{where}: {field} gives {pattern!r} the value {value!r}; {_FIXES['r' if whole else 'alpha']}")
    if "use_rslora" in data and not isinstance(data["use_rslora"], bool):
        raise UserError(f"{where}: use_rslora is {data['use_rslora']!r}; write true or false")
    return data
