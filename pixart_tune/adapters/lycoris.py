"""LyCORIS adapters (LoKr, LoHa) for PixArt-Sigma: read every naming, give the exact update, hand it to PEFT or ComfyUI.

The reference for the format and its math is the ``lycoris-lora`` package (read at
4.1.3: ``lycoris/modules/lokr.py``, ``loha.py``, ``lycoris/functional/lokr.py``,
``loha.py``, ``general.py``). The update a module adds at multiplier 1:

* **LoKr** ``scale * kron(W1, W2)``; ``W1`` = ``lokr_w1`` or ``lokr_w1_a @ lokr_w1_b``;
  ``W2`` = ``lokr_w2``, ``lokr_w2_a @ lokr_w2_b`` (a conv's ``w2_b`` flattened to
  (rank, in2 * kh * kw)), or with ``lokr_t2`` (Tucker, conv) ``einsum("i j k l, i p,
  j r -> p r k l", t2, w2_a, w2_b)``; a 4-dim ``W2`` gives ``W1`` two unit dims, and the
  product is reshaped to the layer's weight. ``scale = alpha / rank``, the rank of the
  decomposed half (``w1_b.shape[0]`` or ``w2_b.shape[0]``); 1 when alpha is absent or
  0, and 1 when both halves are full (``lokr.py``: "if self.use_w2 and self.use_w1:
  alpha = lora_dim").
* **LoHa** ``alpha / rank * (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b)``
  (Hadamard), ``rank = hada_w1_b.shape[0]``; with ``hada_t1``/``hada_t2`` each factor
  is ``einsum("i j k l, j r, i p -> p r k l", t, w_b, w_a)``.

``alpha`` is a 0-dim tensor; ``use_scalar`` is folded into ``w1`` when LyCORIS saves.
Where the readers of these files differ (read in their source):

* LyCORIS 4.1.3 applies ``scale`` once in its training forward, but its
  ``get_diff_weight`` / ``merge_to`` multiply ``get_weight`` (already scaled) by
  ``scale`` again: its own merge is off by ``scale`` whenever scale != 1. A file means
  what it was trained with, so this module follows the forward pass, as ComfyUI and
  PEFT do. (Its ``make_module_from_state_dict`` also misreads a Tucker LoKr's rank.)
* ComfyUI core (``comfy/weight_adapter/lokr.py`` at e8f3bc5, ``loha.py`` at 17adbb5):
  the same products; scale ``alpha / dim`` (``dim`` of ``w2_b``, else ``w1_b``), 1.0
  without alpha or a decomposed half; for ``alpha = 0`` it gives 0 (LyCORIS and this
  module: 1). Its ``torch.kron`` of a Tucker ``W2`` (a non-contiguous einsum result)
  raises under torch 2.13, and it then skips the layer: exports write ``W2`` out. For PixArt it maps ``diffusion_model.`` + original names, ``lora_unet_``
  + underscored original names and ``transformer.`` / ``base_model.model.`` /
  ``unet.base_model.model.`` + diffusers names (q/k/v as row slices of ``attn.qkv``);
  not ``lycoris_*`` names (it does for SD3 and Flux).
* PEFT 0.21 (``tuners/lokr/layer.py``, ``loha/layer.py``): the same products, but
  ``scaling = alpha / r`` always (two full LoKr halves included), one
  ``decompose_factor`` / ``decompose_both`` / ``use_effective_conv2d`` per config, and
  its ``factorization(dim, factor)`` does not put the smaller factor first for an
  explicit factor above sqrt(dim), as LyCORIS's does. :func:`to_peft` deals with all three.

A fused original layer (``blocks.N.attn.qkv``, ``cross_attn.kv_linear``) holds one
module for the stacked q/k/v weight. Its rows split exactly into one module per part
where the structure allows (LoHa always; LoKr when the rows of ``W1`` divide by the
number of parts); otherwise each part becomes a full-update LoKr (``w1 = [[1]]``,
``w2`` = the part's update), still exact. DoRA variants (``dora_scale``) are refused:
their effect depends on the base weight and PEFT has no LoKr/LoHa DoRA.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from typing import Iterable, Mapping, Sequence

import torch
from peft import LoHaConfig, LoKrConfig
from peft.functional import cast_adapter_dtype, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lokr.layer import factorization
from peft.utils.other import get_pattern_key

from pixart_tune.adapters.layouts import LoraModule, diffusers_names, original_name, underscored
from pixart_tune.errors import UserError

LOKR_TENSORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
LOHA_TENSORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
_EXTRA_TENSORS = ("alpha", "dora_scale")

# Prefixes before a module name (a diffusers or an original name, dotted or underscored), most specific first.
_PREFIXES = ("lycoris_", "lora_unet_", "lora_transformer_", "unet.base_model.model.", "base_model.model.", "transformer.", "diffusion_model.", "")

LAYOUTS = ("diffusers", "comfyui", "lycoris")
"""Export layouts (:func:`to_comfyui_state`); ``lycoris`` is LyCORIS' and SimpleTuner's naming, not read by ComfyUI for PixArt."""


# --- the modules ---------------------------------------------------------------------------


def _rank_of(*factors: torch.Tensor | None) -> int | None:
    """The rank the ``*_b`` factors share (their first dim); None without any."""
    ranks = {tensor.shape[0] for tensor in factors if tensor is not None}
    if len(ranks) > 1:
        raise ValueError(f"has factors of different ranks {sorted(ranks)}")
    return ranks.pop() if ranks else None


def _scale(alpha: float | None, rank: int | None) -> float:
    return 1.0 if rank is None or not alpha else alpha / rank


def _fit_shape(natural: tuple[int, ...], shape: Sequence[int] | None) -> tuple[int, ...]:
    """``shape`` when the natural product reshapes to it (a conv weight from a flattened product), else an error."""
    if shape is None:
        return natural
    shape = tuple(int(s) for s in shape)
    if shape[0] != natural[0] or math.prod(shape) != math.prod(natural):
        raise ValueError(f"gives an update of shape {natural} but the layer's weight is {shape}")
    return shape


def _need(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_product(prefix: str, side: str, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None) -> None:
    """``a @ b`` (or the Tucker form with ``t``) must be defined; names are LyCORIS tensor names."""
    names = [(f"{prefix}w{side}_a", a), (f"{prefix}w{side}_b", b)] + ([(f"{prefix}t{side}", t)] if t is not None else [])
    ok = a.ndim == 2 and b.ndim == 2 and (a.shape[1] == b.shape[0] if t is None else t.ndim == 4 and t.shape[:2] == (a.shape[0], b.shape[0]))
    _need(ok, f"has {', '.join(f'{n} {tuple(v.shape)}' for n, v in names)}, which do not fit together")


@dataclasses.dataclass
class LokrModule:
    """One LoKr update, tensors as LyCORIS stores them (``w1`` or ``w1_a``/``w1_b``, ``w2`` or ``w2_a``/``w2_b`` [+ ``t2``])."""

    w1: torch.Tensor | None = None
    w1_a: torch.Tensor | None = None
    w1_b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2_a: torch.Tensor | None = None
    w2_b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    alpha: float | None = None
    """The stored alpha (None when the file has none)."""
    shape: tuple[int, ...] | None = None
    """Weight shape of the target layer; None: the natural shape of the product."""

    def __post_init__(self) -> None:
        for side in ("1", "2"):
            full, a, b = (getattr(self, f"w{side}{suffix}") for suffix in ("", "_a", "_b"))
            _need((full is None) != (a is None and b is None), f"needs lokr_w{side} or lokr_w{side}_a + lokr_w{side}_b, exactly one of them")
            _need((a is None) == (b is None), f"has only one of lokr_w{side}_a / lokr_w{side}_b")
            if a is not None:
                _check_product("lokr_", side, a, b, self.t2 if side == "2" else None)
        _need(self.t2 is None or self.w2_a is not None, "has lokr_t2 without lokr_w2_a / lokr_w2_b")
        _need(self.w1 is None or self.w1.ndim == 2, "has a lokr_w1 that is not a matrix")
        _rank_of(self.w1_b, self.w2_b)
        self.shape = _fit_shape(self.natural_shape, self.shape)

    @property
    def rank(self) -> int | None:
        """Rank of the decomposed half (None when both halves are full matrices)."""
        return _rank_of(self.w1_b, self.w2_b)

    @property
    def scale(self) -> float:
        return _scale(self.alpha, self.rank)

    @property
    def natural_shape(self) -> tuple[int, ...]:
        a, b = self.w1.shape if self.w1 is not None else (self.w1_a.shape[0], self.w1_b.shape[1])
        if self.w2 is not None:
            c, d, *kernel = self.w2.shape
        elif self.t2 is not None:
            c, d, kernel = self.w2_a.shape[1], self.w2_b.shape[1], list(self.t2.shape[2:])
        else:
            c, d, kernel = self.w2_a.shape[0], math.prod(self.w2_b.shape[1:]), []
        return (a * c, b * d, *kernel)

    def delta(self) -> torch.Tensor:
        """The update at multiplier 1, fp32, shaped like the layer's weight (:attr:`shape`)."""
        w1 = self.w1.float() if self.w1 is not None else self.w1_a.float() @ self.w1_b.float()
        if self.w2 is not None:
            w2 = self.w2.float()
        elif self.t2 is not None:
            w2 = torch.einsum("i j k l, i p, j r -> p r k l", self.t2.float(), self.w2_a.float(), self.w2_b.float())
        else:
            w2 = self.w2_a.float() @ self.w2_b.float().reshape(self.w2_b.shape[0], -1)
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        return (torch.kron(w1, w2.contiguous()) * self.scale).reshape(self.shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        """LyCORIS tensor name -> tensor, and an ``alpha`` (0-dim, as LyCORIS stores it) giving the same scale."""
        out = {f"lokr_{n}": getattr(self, n) for n in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2") if getattr(self, n) is not None}
        return {**out, "alpha": torch.tensor(float(self.alpha) if self.alpha else float(self.rank or 1))}

    @classmethod
    def from_delta(cls, delta: torch.Tensor) -> LokrModule:
        """A full update as a LoKr: kron([[1]], delta) at scale 1 (exact; ComfyUI and PEFT read it as such)."""
        return cls(w1=torch.ones(1, 1), w2=delta.detach().float().clone(), shape=tuple(delta.shape))


@dataclasses.dataclass
class LohaModule:
    """One LoHa update: ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b`` [+ ``hada_t1``, ``hada_t2``]."""

    w1_a: torch.Tensor
    w1_b: torch.Tensor
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    alpha: float | None = None
    shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        _need((self.t1 is None) == (self.t2 is None), "has only one of hada_t1 / hada_t2")
        for side in ("1", "2"):
            _check_product("hada_", side, getattr(self, f"w{side}_a"), getattr(self, f"w{side}_b"), getattr(self, f"t{side}"))
        _rank_of(self.w1_b, self.w2_b)
        first, second = self._factor_shape("1"), self._factor_shape("2")
        _need(first == second, f"has two factors of different shapes {first} and {second}")
        self.shape = _fit_shape(first, self.shape)

    def _factor_shape(self, side: str) -> tuple[int, ...]:
        a, b, t = getattr(self, f"w{side}_a"), getattr(self, f"w{side}_b"), getattr(self, f"t{side}")
        return (a.shape[0], b.shape[1]) if t is None else (a.shape[1], b.shape[1], *t.shape[2:])

    @property
    def rank(self) -> int:
        return _rank_of(self.w1_b, self.w2_b)

    @property
    def scale(self) -> float:
        return _scale(self.alpha, self.rank)

    def delta(self) -> torch.Tensor:
        """The update at multiplier 1, fp32, shaped like the layer's weight (:attr:`shape`)."""

        def factor(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
            return a.float() @ b.float() if t is None else torch.einsum("i j k l, j r, i p -> p r k l", t.float(), b.float(), a.float())

        product = factor(self.w1_a, self.w1_b, self.t1) * factor(self.w2_a, self.w2_b, self.t2)
        return (product * self.scale).reshape(self.shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"hada_{n}": getattr(self, n) for n in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2") if getattr(self, n) is not None}
        return {**out, "alpha": torch.tensor(float(self.alpha) if self.alpha else float(self.rank))}


LycorisModule = LokrModule | LohaModule


# --- reading ---------------------------------------------------------------------------------


def _split_key(key: str) -> tuple[str, str] | None:
    module, _, tensor = key.rpartition(".")
    return (module, tensor) if module and tensor in LOKR_TENSORS + LOHA_TENSORS + _EXTRA_TENSORS else None


def lycoris_keys(state: Iterable[str]) -> set[str]:
    """The keys of LoKr / LoHa modules (their ``alpha`` included); the rest of a mixed file is plain LoRA."""
    parts = {key: _split_key(key) for key in state}
    modules = {p[0] for p in parts.values() if p and p[1] in LOKR_TENSORS + LOHA_TENSORS}
    return {key for key, p in parts.items() if p and p[0] in modules}


def _name_table(module_names: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """Each spelling of a layer (diffusers or original name, dotted or underscored) -> its diffusers names."""
    table: dict[str, tuple[str, ...]] = {}
    for name in module_names:
        table[name] = (name,)
        try:
            original = original_name(name)[0]
        except UserError:
            continue
        table[original] = diffusers_names(original)
    return {**table, **{underscored(spelling): names for spelling, names in table.items()}}


def _resolve(table: dict[str, tuple[str, ...]], raw: str) -> tuple[str, ...] | None:
    for prefix in _PREFIXES:
        if raw.startswith(prefix) and raw[len(prefix):] in table:
            return table[raw[len(prefix):]]
    return None


def _build(raw: str, tensors: dict[str, torch.Tensor], alpha: float | None) -> LycorisModule:
    kinds = {"lokr" if name.startswith("lokr_") else "loha" for name in tensors if name not in _EXTRA_TENSORS}
    if len(kinds) > 1:
        raise UserError(f"LyCORIS module {raw} mixes LoKr (lokr_*) and LoHa (hada_*) tensors; the file is damaged")
    if "dora_scale" in tensors:
        raise UserError(
            f"LyCORIS module {raw} is weight-decomposed (dora_scale): DoRA LoKr/LoHa changes the base weight's norm and is "
            "not supported; use an adapter trained without dora_wd"
        )
    try:
        if kinds == {"lokr"}:
            return LokrModule(**{name[len("lokr_"):]: t for name, t in tensors.items() if name.startswith("lokr_")}, alpha=alpha)
        missing = [f"hada_{n}" for n in ("w1_a", "w1_b", "w2_a", "w2_b") if f"hada_{n}" not in tensors]
        if missing:
            raise ValueError(f"lacks {', '.join(missing)}")
        return LohaModule(**{name[len("hada_"):]: t for name, t in tensors.items() if name.startswith("hada_")}, alpha=alpha)
    except ValueError as error:
        raise UserError(f"LyCORIS module {raw} {error}") from None


def read_lycoris(
    state: Mapping[str, torch.Tensor],
    module_names: Iterable[str],
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, LycorisModule]:
    """LoKr / LoHa modules of a flat state dict, by diffusers module name (other keys are ignored).

    Namings: ``lycoris_`` / ``lora_unet_`` / ``lora_transformer_`` + underscored diffusers
    or original names; ``transformer.`` / ``base_model.model.`` / ``unet.base_model.model.``
    / ``diffusion_model.`` / no prefix + diffusers or original names (PEFT folders: use
    :func:`read_peft_lycoris`). A fused original layer is split into its parts.
    ``module_names``: the transformer's diffusers names; ``shapes`` (name -> weight
    shape) checks each module against its layer and gives a convolution its kernel.
    """
    table, groups = _name_table(module_names), {}
    for key in lycoris_keys(state):
        module, tensor = _split_key(key)
        groups.setdefault(module, {})[tensor] = state[key]
    modules: dict[str, LycorisModule] = {}
    for raw, tensors in sorted(groups.items()):
        targets = _resolve(table, raw)
        if targets is None:
            raise UserError(
                f"LyCORIS module {raw} matches no PixArt-Sigma layer (expected names such as "
                "'lycoris_transformer_blocks_0_attn1_to_q' or 'diffusion_model.blocks.0.attn.qkv'); the file is for another model"
            )
        alpha = float(tensors["alpha"].float().reshape(-1)[0]) if "alpha" in tensors else None
        module = _build(raw, tensors, alpha)
        parts = split_fused(module, len(targets), raw) if len(targets) > 1 else [module]
        for target, part in zip(targets, parts):
            modules[target] = _with_shape(part, (shapes or {}).get(target), f"LyCORIS module {raw} ({target})")
    if not modules:
        raise UserError("the file holds no LoKr or LoHa weights (no lokr_* or hada_* keys)")
    return modules


def _with_shape(module: LycorisModule, shape: Sequence[int] | None, what: str) -> LycorisModule:
    if shape is None:
        return module
    try:
        return dataclasses.replace(module, shape=tuple(shape))
    except ValueError as error:
        raise UserError(f"{what} does not fit this model: it {error}; it was made for a different base model") from None


def fit_shapes(modules: Mapping[str, LycorisModule], model: torch.nn.Module) -> dict[str, LycorisModule]:
    """``modules`` checked against ``model``'s layers and given their weight shapes (a UserError names the first misfit)."""
    out = {}
    for name, module in modules.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise UserError(f"LyCORIS module {name} has no layer in this model; it was made for a different base model") from None
        layer = getattr(layer, "base_layer", layer)
        out[name] = _with_shape(module, tuple(layer.weight.shape), f"LyCORIS module {name}")
    return out


def split_fused(module: LycorisModule, parts: int, what: str = "fused module") -> list[LycorisModule]:
    """Exact per-part modules of a module on a fused layer, rows split evenly (module docstring)."""
    rows = module.shape[0]
    if rows % parts or len(module.shape) != 2:
        raise UserError(f"{what}: a fused layer's update of shape {module.shape} cannot split into {parts} parts")
    size = rows // parts
    if isinstance(module, LohaModule):
        return [dataclasses.replace(module, w1_a=a, w2_a=b, shape=(size, module.shape[1]))
                for a, b in zip(module.w1_a.chunk(parts), module.w2_a.chunk(parts))]
    first = module.w1 if module.w1 is not None else module.w1_a
    if first.shape[0] % parts == 0:
        field = "w1" if module.w1 is not None else "w1_a"
        return [dataclasses.replace(module, **{field: rows_}, shape=(size, module.shape[1])) for rows_ in first.chunk(parts)]
    return [LokrModule.from_delta(rows_) for rows_ in module.delta().chunk(parts)]


def read_peft_lycoris(state: Mapping[str, torch.Tensor], config: Mapping, module_names: Iterable[str]) -> dict[str, LycorisModule]:
    """LoKr / LoHa modules of a PEFT adapter (its state dict and ``adapter_config.json`` contents).

    PEFT scales every module by ``alpha / r`` (per-module ``rank_pattern`` /
    ``alpha_pattern``), LoKr with two full halves included; the modules returned carry
    that scale in LyCORIS terms (alpha = scale * rank, or the scale folded into ``w1``).
    """
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in ("LOKR", "LOHA"):
        raise UserError(f"the adapter config says peft_type {peft_type or '(none)'}, not LOKR or LOHA")
    plain = {key: value for key, value in state.items() if not key.endswith(".alpha")}
    modules = read_lycoris(plain, module_names)
    default_r, default_alpha = config.get("r", 8), config.get("alpha", 8)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    out = {}
    for name, module in modules.items():
        r = rank_pattern.get(get_pattern_key(list(rank_pattern), name), default_r)
        alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), name), default_alpha)
        scale = float(alpha) / float(r)
        if module.rank is not None and scale != 0:
            out[name] = dataclasses.replace(module, alpha=scale * module.rank)
        else:  # read without alpha, so at scale 1: the scale goes into the first factor
            field = "w1_a" if isinstance(module, LohaModule) or module.w1 is None else "w1"
            out[name] = dataclasses.replace(module, **{field: getattr(module, field).float() * scale})
    return out


# --- PEFT ----------------------------------------------------------------------------------


@dataclasses.dataclass
class PeftPart:
    """One PEFT injection: a config and the state dict (PEFT key names) that fills the layers it makes."""

    config: LoKrConfig | LoHaConfig
    state: dict[str, torch.Tensor]


def _peft_lokr_shapes(weight: Sequence[int], r: int, factor: int, both: bool, effective: bool) -> dict[str, tuple[int, ...]]:
    """The LoKr parameters PEFT 0.21 creates for a layer (``LoKrLayer.update_layer``, ``create_adapter_parameters``)."""
    out_dim, in_dim, *kernel = weight
    (a, c), (b, d) = factorization(out_dim, factor), factorization(in_dim, factor)
    shapes: dict[str, tuple[int, ...]] = {}
    if both and r < max(a, b) / 2:
        shapes.update(lokr_w1_a=(a, r), lokr_w1_b=(r, b))
    else:
        shapes["lokr_w1"] = (a, b)
    if r >= max(c, d) / 2:
        shapes["lokr_w2"] = (c, d, *kernel)
    elif effective and any(k != 1 for k in kernel):
        shapes.update(lokr_t2=(r, r, *kernel), lokr_w2_a=(r, c), lokr_w2_b=(r, d))
    else:
        shapes.update(lokr_w2_a=(c, r), lokr_w2_b=(r, d * math.prod(kernel)))
    return shapes


def _peft_loha_shapes(weight: Sequence[int], r: int, effective: bool) -> dict[str, tuple[int, ...]]:
    """The LoHa parameters PEFT 0.21 creates for a layer (``LoHaLayer.update_layer``)."""
    out_dim, in_dim, *kernel = weight
    tucker = effective and any(k != 1 for k in kernel)
    one = {"t": (r, r, *kernel), "w_a": (r, out_dim), "w_b": (r, in_dim)} if tucker else {"w_a": (out_dim, r), "w_b": (r, in_dim * math.prod(kernel))}
    return {f"hada_{key[0]}{i}{key[1:]}": shape for i in (1, 2) for key, shape in one.items()}


def peft_tensors(module: LycorisModule) -> dict[str, torch.Tensor]:
    """PEFT parameter name (``lokr_w1``, ``hada_w1_a``, ...) -> fp32 tensor, in the shapes PEFT gives them."""
    tensors = {key: value.detach().float() for key, value in module.tensors().items() if key != "alpha"}
    if isinstance(module, LokrModule) and module.w2_b is not None and module.t2 is None:
        tensors["lokr_w2_b"] = tensors["lokr_w2_b"].reshape(module.w2_b.shape[0], -1)
    return tensors


def _peft_rank(module: LycorisModule) -> int:
    if module.rank is not None:
        return module.rank
    w1, w2 = module.w1.shape, module.w2.shape  # both halves full: any r that keeps them full
    return max(*w1, *w2[:2])


def _settings(module: LycorisModule) -> list[tuple]:
    """The PEFT settings ((kind, factor, decompose_both, effective_conv2d)) that recreate ``module``'s tensors."""
    have = {key: tuple(value.shape) for key, value in peft_tensors(module).items()}
    r = _peft_rank(module)
    if isinstance(module, LohaModule):
        return [("loha", None, None, eff) for eff in (False, True) if _peft_loha_shapes(module.shape, r, eff) == have]
    factors = [-1] + sorted({d for shape in have.values() for d in shape if d > 0})
    return [
        ("lokr", factor, both, eff)
        for factor in factors for both in (False, True) for eff in (False, True)
        if _peft_lokr_shapes(module.shape, r, factor, both, eff) == have
    ]


def to_peft(modules: Mapping[str, LycorisModule]) -> list[PeftPart]:
    """PEFT configs and state dicts whose layers add exactly each module's :meth:`delta`.

    PEFT scales by ``alpha / r``: each module gets ``r`` = its rank (for a LoKr with two
    full halves, one that keeps them full) and ``alpha = scale * r`` (``rank_pattern``,
    ``alpha_pattern``). PEFT takes the LoKr shapes from one ``decompose_factor`` /
    ``decompose_both`` / ``use_effective_conv2d`` per config, so modules are grouped by
    the settings that recreate their tensors; one that none recreates goes in as its
    full update (``decompose_factor=1``, ``w1 = [[1]]``). Inject all parts under one
    adapter name (:func:`inject`); modules must carry their layer's shape (:func:`fit_shapes`).
    """
    options: dict[str, list[tuple]] = {}
    prepared: dict[str, LycorisModule] = {}
    for name, module in modules.items():
        found = _settings(module)
        if not found:
            module = LokrModule.from_delta(module.delta())
            found = _settings(module)
        prepared[name], options[name] = module, found
    parts = []
    left = dict(options)
    while left:
        order = list(dict.fromkeys(s for found in left.values() for s in found))
        best = max(order, key=lambda s: sum(s in found for found in left.values()))
        names = sorted(n for n, found in left.items() if best in found)
        parts.append(_peft_part(best, {n: prepared[n] for n in names}))
        left = {n: found for n, found in left.items() if n not in names}
    return parts


def _peft_part(setting: tuple, modules: dict[str, LycorisModule]) -> PeftPart:
    kind, factor, both, eff = setting
    ranks = {name: _peft_rank(module) for name, module in modules.items()}
    # PEFT matches pattern keys as regexes on the end of the module name.
    common = {"r": max(ranks.values()), "alpha": float(max(ranks.values())), "target_modules": sorted(modules),
              "rank_pattern": {re.escape(n): r for n, r in ranks.items()}, "use_effective_conv2d": bool(eff),
              "alpha_pattern": {re.escape(n): modules[n].scale * r for n, r in ranks.items()}}
    if kind == "loha":
        config = LoHaConfig(**common)
    else:
        config = LoKrConfig(**common, decompose_both=bool(both), decompose_factor=int(factor))
    state = {f"{name}.{key}": value for name, module in modules.items() for key, value in peft_tensors(module).items()}
    return PeftPart(config, state)


def inject(model: torch.nn.Module, modules: Mapping[str, LycorisModule], adapter_name: str = "default") -> None:
    """Adds ``modules`` to ``model`` through PEFT as the frozen adapter ``adapter_name`` (fp32 adapter weights).

    Each part of :func:`to_peft` is injected and loaded in turn under the one name,
    so PEFT's ``set_scale`` / ``set_adapter`` / ``merge`` treat it as one adapter.
    """
    for part in to_peft(fit_shapes(modules, model)):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            inject_adapter_in_model(part.config, model, adapter_name=adapter_name)
        cast_adapter_dtype(model, adapter_name=adapter_name)
        result = set_peft_model_state_dict(model, part.state, adapter_name=adapter_name)
        wanted = {f"{key}.{adapter_name}" for key in part.state}
        lost = [k for k in [*result.missing_keys, *result.unexpected_keys] if k in wanted]
        if lost:
            raise UserError(f"LyCORIS weights did not load into the model: {', '.join(sorted(lost)[:3])}")
    for name, parameter in model.named_parameters():
        if name.endswith(f".{adapter_name}") and any(f".{t}." in name for t in LOKR_TENSORS + LOHA_TENSORS):
            parameter.requires_grad_(False)


# --- writing -------------------------------------------------------------------------------


def _same(first: torch.Tensor | None, second: torch.Tensor | None) -> bool:
    return first is second or (first is not None and second is not None and torch.equal(first, second))


def _stack(parts: dict[int, LycorisModule], count: int) -> LycorisModule:
    """One module for a fused layer whose parts are ``parts`` (index -> module), exactly.

    Parts that :func:`split_fused` made stack back into the original module; anything
    else becomes the stacked full update (missing parts are zero rows).
    """
    first = parts[min(parts)]
    rows, columns = first.shape[0], first.shape[1]
    shape = (rows * count, columns)
    if len(parts) == count and all(type(p) is type(first) and p.shape == first.shape and p.alpha == first.alpha for p in parts.values()):
        ordered = [parts[i] for i in range(count)]
        if isinstance(first, LohaModule):
            if first.t1 is None and all(_same(p.w1_b, first.w1_b) and _same(p.w2_b, first.w2_b) for p in ordered):
                return dataclasses.replace(first, w1_a=torch.cat([p.w1_a for p in ordered]), w2_a=torch.cat([p.w2_a for p in ordered]), shape=shape)
        else:
            field = "w1" if first.w1 is not None else "w1_a"
            shared = ("w1_b", "w2", "w2_a", "w2_b", "t2")
            if all(getattr(p, field) is not None and all(_same(getattr(p, s), getattr(first, s)) for s in shared) for p in ordered):
                return dataclasses.replace(first, **{field: torch.cat([getattr(p, field) for p in ordered])}, shape=shape)
    blocks = [parts[i].delta() if i in parts else torch.zeros(rows, columns) for i in range(count)]
    return LokrModule.from_delta(torch.cat(blocks))


def fuse_original(modules: Mapping[str, LycorisModule]) -> dict[str, LycorisModule]:
    """Modules by original checkpoint name, q/k/v parts stacked into the fused layer exactly (:func:`_stack`)."""
    groups: dict[str, tuple[int, dict[int, LycorisModule]]] = {}
    for name, module in modules.items():
        original, index, count = original_name(name)
        groups.setdefault(original, (count, {}))[1][index] = module
    return {original: parts[0] if count == 1 else _stack(parts, count) for original, (count, parts) in groups.items()}


def to_comfyui_state(modules: Mapping[str, LycorisModule], layout: str = "diffusers") -> dict[str, torch.Tensor]:
    """A flat LyCORIS state dict (fp32, an ``alpha`` per module) in ``layout``: ``diffusers`` (``transformer.`` +
    diffusers names; ComfyUI core applies q/k/v as slices of the fused layer), ``comfyui`` (``diffusion_model.`` +
    original names, q/k/v fused by :func:`fuse_original`) or ``lycoris`` (``lycoris_`` + underscored diffusers names)."""
    modules = {name: _without_tucker(module) for name, module in modules.items()}
    if layout == "diffusers":
        named, prefix = dict(modules), "transformer."
    elif layout == "comfyui":
        named, prefix = fuse_original(modules), "diffusion_model."
    elif layout == "lycoris":
        named, prefix = {underscored(n): m for n, m in modules.items()}, "lycoris_"
    else:
        raise UserError(f"unknown LyCORIS layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    tensors = {f"{prefix}{name}.{key}": value for name, module in named.items() for key, value in module.tensors().items()}
    return {key: value.detach().to(torch.float32).contiguous().cpu() for key, value in tensors.items()}


def _without_tucker(module: LycorisModule) -> LycorisModule:
    """A Tucker LoKr with its W2 written out: the same update, which ComfyUI applies (module docstring)."""
    if not isinstance(module, LokrModule) or module.t2 is None:
        return module
    w2 = LokrModule(w1=torch.ones(1, 1), w2_a=module.w2_a, w2_b=module.w2_b, t2=module.t2).delta()  # scale 1
    factor = module.scale if module.w1 is not None else 1.0  # two full halves: scale 1, fold it into W2
    return dataclasses.replace(module, w2=(w2 * factor).contiguous(), w2_a=None, w2_b=None, t2=None)


def lora_from_delta(delta: torch.Tensor, rank: int) -> tuple[LoraModule, float, float]:
    """The best rank-``rank`` LoRA of a full update (merging LyCORIS into a plain LoRA): (module, energy kept, total)."""
    # Imported here: merge imports the loader, which calls into this module.
    from pixart_tune.adapters.merge import truncated_svd

    matrix = delta.detach().double().reshape(delta.shape[0], -1)
    module, kept, total = truncated_svd(matrix, torch.eye(matrix.shape[1], dtype=torch.float64), rank)
    if delta.ndim == 4:  # the canonical Conv2d LoRA: down (r, in, kh, kw), up (out, r, 1, 1)
        module = LoraModule(module.down.reshape(-1, *delta.shape[1:]), module.up[:, :, None, None], module.alpha)
    return module, kept, total
