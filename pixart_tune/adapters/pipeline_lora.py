"""diffusers' LoRA methods for ``PixArtSigmaPipeline``, which diffusers does not give it.

diffusers has no LoRA loader for PixArt (its issues #9887, #11216, #14004), so
this module supplies the methods its ``LoraBaseMixin`` gives other pipelines,
with the same names, arguments and behaviour, over pixart-tune's loader (any
layout :func:`~pixart_tune.adapters.loader.read_lora` reads, at its true
strength) and PEFT's layers in the transformer:

- :class:`PixArtSigmaLoraLoaderMixin`: the methods; :class:`PixArtSigmaLoraPipeline`
  is ``PixArtSigmaPipeline`` with them;
- :func:`enable_lora` gives them to one pipeline already built (any pipeline
  whose ``transformer`` is a ``PixArtTransformer2DModel``);
- importing this module calls :func:`install`, which adds them to diffusers'
  ``PixArtSigmaPipeline`` class itself, but only while that class has none of
  them: a diffusers release with its own PixArt LoRA methods keeps its own.
  Adding methods to another library's class is a side effect of the import; it
  is what makes ``pipe.load_lora_weights(...)`` work on a pipeline built by any
  code, and it adds names only, never replacing one.

Where it differs from diffusers, on purpose (docs/python-api.md has the table):
every layout the toolkit reads, ``LoraWeights`` too, pickle only with
``allow_pickle=True``; default names skip names in use; ``set_adapters([])`` runs
the base model; per-module weights match whole dotted name parts; ``unfuse_lora``
restores each fused weight bit for bit (diffusers subtracts, which leaves bf16
rounding) and each adapter's weight; the transformer stays frozen; unknown names
in ``delete_adapters`` / ``fuse_lora`` are skipped with a warning. A file's T5
part (OneTrainer writes one when the text encoder trained) loads into
``pipe.text_encoder`` under the same name and follows the transformer part in
``set_adapters`` (at the adapter's number weight; 1.0 for per-module weights),
``delete_adapters``, ``unload_lora_weights`` and ``disable_lora``/``enable_lora``;
``fuse_lora`` fuses the transformer only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel
from peft.tuners.tuners_utils import BaseTunerLayer

from pixart_tune.adapters import lora
from pixart_tune.adapters.layouts import LoraWeights, from_state_dict, pixart_module_names
from pixart_tune.adapters.loader import apply_lora, apply_text_lora, load_into, read_lora
from pixart_tune.errors import UserError
from pixart_tune.hub import hub_trouble, looks_like_path

__all__ = ["LoraApiError", "PixArtSigmaLoraLoaderMixin", "PixArtSigmaLoraPipeline", "enable_lora", "install"]

logger = logging.getLogger(__name__)

COMPONENT = "transformer"
"""The one component PixArt LoRAs load into (diffusers' ``_lora_loadable_modules``)."""

_HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download")
# diffusers arguments that have no meaning here: loading is always low-memory, safetensors first.
_IGNORED_KWARGS = ("low_cpu_mem_usage", "use_safetensors", "proxies")
# The attribute on the transformer that holds what fuse_lora changed.
_FUSED_ATTRIBUTE = "_pixart_tune_fused"


class LoraApiError(UserError, ValueError):
    """A misuse diffusers answers with ``ValueError`` (unknown or taken adapter name, wrong lengths)."""


# --- the transformer's adapters -----------------------------------------------------------


def _tuner_layers(transformer: torch.nn.Module) -> dict[str, BaseTunerLayer]:
    return {name: m for name, m in transformer.named_modules() if isinstance(m, BaseTunerLayer)}


def _adapters_of(layer: BaseTunerLayer) -> set[str]:
    return {name for attribute in layer.adapter_layer_names for name in getattr(layer, attribute).keys()}


def list_adapters(transformer: torch.nn.Module) -> list[str]:
    """Every adapter in ``transformer``, in the order they were loaded."""
    present: set[str] = set()
    for layer in _tuner_layers(transformer).values():
        present |= _adapters_of(layer)
    ordered = [name for name in getattr(transformer, "peft_config", {}) if name in present]
    return ordered + sorted(present - set(ordered))


def active_adapters(transformer: torch.nn.Module) -> list[str]:
    """The active adapters, as diffusers reads them: those of the first LoRA layer."""
    for layer in _tuner_layers(transformer).values():
        return list(layer.active_adapters)
    return []


@contextlib.contextmanager
def _keeping_grad_flags(transformer: torch.nn.Module) -> Iterator[None]:
    """PEFT's adapter switches mark the active adapters trainable; put every flag back as it was."""
    flags = [(p, p.requires_grad) for p in transformer.parameters()]
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def _unknown(names: Sequence[str], transformer: torch.nn.Module, what: str) -> None:
    unknown = [name for name in names if name not in list_adapters(transformer)]
    if unknown:
        logger.warning("%s: no adapter named %s is loaded (loaded: %s); skipped", what, ", ".join(unknown), list_adapters(transformer))


# --- reading ---------------------------------------------------------------------------------


def read_source(
    transformer: torch.nn.Module,
    source: str | os.PathLike | Mapping[str, torch.Tensor] | LoraWeights,
    weight_name: str | None = None,
    subfolder: str | None = None,
    allow_pickle: bool = False,
    **hub: Any,
) -> LoraWeights:
    """The LoRA ``source`` names: weights, a state dict, a local file or folder, or a hub repo (+ ``weight_name``).

    A hub repo is looked up once (no retries) and loaded from the local cache
    after; one that cannot be had raises a one-line error. Without
    ``weight_name`` the repo (or its ``subfolder``) must be a PEFT adapter folder
    or hold one ``.safetensors`` file, as for a local folder.
    """
    if isinstance(source, LoraWeights):
        return source
    if isinstance(source, Mapping):
        state = {key: value for key, value in source.items() if isinstance(value, torch.Tensor)}
        # An in-memory state has no header or sidecar: alpha from ``.alpha`` tensors, else alpha = rank.
        return from_state_dict(state, pixart_module_names(len(transformer.transformer_blocks)))
    text = os.fspath(source)
    folder = Path(text).expanduser()
    if subfolder:
        folder = folder / subfolder
    if folder.is_file():
        return read_lora(folder, allow_pickle)
    if not folder.exists():
        if looks_like_path(text) or text.count("/") != 1:
            raise LoraApiError(f"{text!r} is neither a LoRA file or folder here nor a Hugging Face Hub id (owner/name)")
        try:
            folder = _from_hub(text, weight_name, subfolder, hub)
        except UserError as error:
            # "owner/name" may also have been meant as a relative path: say both.
            raise UserError(f"no file or folder {text!r} here; as a Hugging Face Hub id: {error}") from None
    return read_lora(folder / weight_name if weight_name else folder, allow_pickle)


def _from_hub(repo: str, weight_name: str | None, subfolder: str | None, hub: dict[str, Any]) -> Path:
    """The local folder of ``repo`` (its ``subfolder``) with the LoRA file and the JSON files beside it."""
    from huggingface_hub import snapshot_download

    sub = f"{subfolder.strip('/')}/" if subfolder else ""
    if weight_name:
        allow, ignore = [f"{sub}{weight_name}", f"{sub}*.json"], None
    else:
        allow, ignore = [f"{sub}*.safetensors", f"{sub}*.json"], [f"{sub}*/*"]
    try:
        root = snapshot_download(repo, allow_patterns=allow, ignore_patterns=ignore, **hub)
    except Exception as error:  # hub errors come in many classes; hub_trouble sorts them into one line
        raise hub_trouble(repo, "LoRA", "load_lora_weights", error) from None
    folder = Path(root) / sub if sub else Path(root)
    if weight_name and not (folder / weight_name).is_file():
        # Patterns that match nothing download nothing, without an error.
        raise UserError(f"LoRA repo {repo!r} has no file {sub}{weight_name} (on the Hugging Face Hub or in the local cache); check weight_name")
    return folder


# --- the methods' work, on a transformer ---------------------------------------------------------


def load(
    transformer: torch.nn.Module,
    lora_source: Any,
    adapter_name: str | None = None,
    hotswap: bool = False,
    text_encoder: torch.nn.Module | None = None,
    **kwargs: Any,
) -> str:
    """:meth:`PixArtSigmaLoraLoaderMixin.load_lora_weights` on a transformer (and the T5 part into
    ``text_encoder`` when given); returns the adapter's name."""
    allow_pickle = bool(kwargs.pop("allow_pickle", False))
    label = kwargs.pop("source", None)
    where = {key: kwargs.pop(key) for key in ("weight_name", "subfolder") if key in kwargs}
    hub = {key: kwargs.pop(key) for key in _HUB_KWARGS if key in kwargs}
    for key in _IGNORED_KWARGS:
        kwargs.pop(key, None)
    if kwargs:
        raise TypeError(f"load_lora_weights() got unexpected keyword arguments: {', '.join(sorted(kwargs))}")
    loaded = list_adapters(transformer)
    if hotswap and adapter_name not in loaded:
        raise LoraApiError(
            f"Trying to hotswap LoRA adapter '{adapter_name}' but there is no existing adapter by that name. "
            "Please choose an existing adapter name or set `hotswap=False` to prevent hotswapping."
        )
    if not hotswap and adapter_name in loaded:
        raise LoraApiError(f"Adapter name {adapter_name} already in use in the model - please select a new adapter name.")
    if adapter_name is not None and (not adapter_name or "." in adapter_name):
        raise LoraApiError(f"adapter name {adapter_name!r} must be non-empty and without dots (PEFT keys layers by it)")
    weights = read_source(transformer, lora_source, allow_pickle=allow_pickle, **where, **hub)
    if label is None:
        label = os.fspath(lora_source) if isinstance(lora_source, (str, os.PathLike)) else "LoRA weights"
        if where.get("weight_name"):
            label += f" ({where['weight_name']})"
    if hotswap:
        # In place, the layers untouched: a compiled model is not recompiled. Same targets, ranks and alphas only.
        load_into(transformer, weights, adapter_name, source=label, target=f"adapter {adapter_name!r}", advice="load it under a new name instead")
        return adapter_name
    name = adapter_name or _default_name(transformer, loaded)
    apply_lora(transformer, weights, name, source=label)  # frozen, like every parameter of the transformer after it
    if weights.text_encoder is not None:
        if text_encoder is None:
            logger.warning("%s: its T5 text-encoder LoRA is not applied: no text encoder is loaded (the transformer part is)", label)
        else:
            apply_text_lora(text_encoder, weights, name, source=label)
    return name


def _default_name(transformer: torch.nn.Module, loaded: list[str]) -> str:
    """diffusers' ``default_N`` (N = adapters in the first LoRA layer), skipping names in use."""
    layers = list(_tuner_layers(transformer).values())
    index = len(_adapters_of(layers[0])) if layers else 0
    while f"default_{index}" in loaded:
        index += 1
    return f"default_{index}"


def set_adapters(transformer: torch.nn.Module, adapter_names: str | Sequence[str], adapter_weights: Any = None) -> None:
    """:meth:`PixArtSigmaLoraLoaderMixin.set_adapters` on a transformer."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    weights = adapter_weights if isinstance(adapter_weights, list) else [adapter_weights] * len(names)
    if len(names) != len(weights):
        raise LoraApiError(f"Length of adapter names {len(names)} is not equal to the length of the weights {len(weights)}")
    loaded = list_adapters(transformer)
    missing = set(names) - set(loaded)
    if missing:
        raise LoraApiError(f"Adapter name(s) {missing} not in the list of present adapters: {set(loaded)}.")
    weights = [_transformer_weight(name, weight) for name, weight in zip(names, weights)]
    record = _fused_record(transformer)
    with _keeping_grad_flags(transformer):
        for module_name, layer in _tuner_layers(transformer).items():
            layer.set_adapter(names, inference_mode=True)
            for name, weight in zip(names, weights):
                if name in _adapters_of(layer):
                    layer.set_scale(name, _module_weight(weight, module_name))
                    if record is not None:
                        # Weights set now win over those unfuse_lora would bring back.
                        record.scales.pop((module_name, name), None)


def _transformer_weight(name: str, weight: Any) -> float | dict[str, float]:
    """An adapter's weight for the transformer, read as diffusers reads it.

    A number (None: 1.0), or a dict by component whose ``"transformer"`` entry is
    a number or a dict by module (other components are ignored with a warning).
    """
    if weight is None:
        return 1.0
    if not isinstance(weight, Mapping):
        return float(weight)
    others = sorted(set(weight) - {COMPONENT})
    if others:
        logger.warning("set_adapters: adapter %s: weights for %s ignored; PixArt LoRAs load into the transformer only", name, others)
    inner = weight.get(COMPONENT)
    if isinstance(inner, Mapping):
        return {str(key): float(value) for key, value in inner.items()}
    return 1.0 if inner is None else float(inner)


def _module_weight(weight: float | dict[str, float], module_name: str) -> float:
    """The weight for one layer: the first key that is a run of whole dotted parts of its name, else 1.0."""
    if not isinstance(weight, dict):
        return weight
    for key, value in weight.items():
        if f".{key}." in f".{module_name}.":
            return value
    return 1.0


def delete_adapters(transformer: torch.nn.Module, adapter_names: str | Sequence[str]) -> None:
    """:meth:`PixArtSigmaLoraLoaderMixin.delete_adapters` on a transformer."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    _unknown(names, transformer, "delete_adapters")
    record = _fused_record(transformer)
    with _keeping_grad_flags(transformer):
        for name in names:
            lora.remove(transformer, name)
            getattr(transformer, "peft_config", {}).pop(name, None)
            if record is not None:
                record.scales = {key: value for key, value in record.scales.items() if key[1] != name}


def set_enabled(transformer: torch.nn.Module, enabled: bool) -> None:
    """:meth:`~PixArtSigmaLoraLoaderMixin.enable_lora` / ``disable_lora`` on a transformer.

    Disabling a fused transformer puts the fused weights back exactly first:
    PEFT would otherwise subtract the update again on the next forward pass.
    """
    if not enabled:
        _restore_weights(transformer)
    with _keeping_grad_flags(transformer):
        for layer in _tuner_layers(transformer).values():
            layer.enable_adapters(enabled)


# --- fusing --------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Fused:
    """What fuse_lora changed: each base layer's weights as they were, and each adapter's scaling."""

    weights: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = dataclasses.field(default_factory=dict)
    scales: dict[tuple[str, str], float] = dataclasses.field(default_factory=dict)


def _fused_record(transformer: torch.nn.Module) -> _Fused | None:
    return transformer.__dict__.get(_FUSED_ATTRIBUTE)


def fused_adapters(transformer: torch.nn.Module) -> set[str]:
    return {name for layer in _tuner_layers(transformer).values() for name in layer.merged_adapters}


def fuse(transformer: torch.nn.Module, lora_scale: float = 1.0, safe_fusing: bool = False, adapter_names: Sequence[str] | None = None) -> None:
    """:meth:`PixArtSigmaLoraLoaderMixin.fuse_lora` on a transformer."""
    if adapter_names is not None:
        adapter_names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        _unknown(adapter_names, transformer, "fuse_lora")
    record = _fused_record(transformer) or _Fused()
    transformer.__dict__[_FUSED_ATTRIBUTE] = record
    for module_name, layer in _tuner_layers(transformer).items():
        chosen = layer.active_adapters if adapter_names is None else adapter_names
        names = [n for n in chosen if n in _adapters_of(layer) and n not in layer.merged_adapters]
        if not names:
            continue
        base = layer.get_base_layer()
        if module_name not in record.weights:
            bias = getattr(base, "bias", None)
            record.weights[module_name] = (
                base.weight.detach().to("cpu", copy=True),
                None if bias is None else bias.detach().to("cpu", copy=True),
            )
        scales = {n: layer.scaling[n] for n in names}
        for name in names:
            record.scales.setdefault((module_name, name), scales[name])
            layer.scaling[name] = scales[name] * lora_scale
        try:
            layer.merge(safe_merge=safe_fusing, adapter_names=names)
        except Exception:
            layer.scaling.update(scales)
            raise


def unfuse(transformer: torch.nn.Module) -> None:
    """:meth:`PixArtSigmaLoraLoaderMixin.unfuse_lora` on a transformer."""
    record = _fused_record(transformer)
    _restore_weights(transformer)
    if record is None:
        return
    layers = _tuner_layers(transformer)
    for (module_name, name), scale in record.scales.items():
        layer = layers.get(module_name)
        if layer is not None and name in layer.scaling:
            layer.scaling[name] = scale
    del transformer.__dict__[_FUSED_ATTRIBUTE]


def _restore_weights(transformer: torch.nn.Module) -> None:
    """Every fused layer unmerged, with the weights it had before fusing put back bit for bit."""
    record = _fused_record(transformer)
    for module_name, layer in _tuner_layers(transformer).items():
        if layer.merged:
            layer.unmerge()  # PEFT's own bookkeeping (merged names, DoRA caches); the weights come next
        saved = record.weights.pop(module_name, None) if record is not None else None
        if saved is not None:
            base = layer.get_base_layer()
            with torch.no_grad():
                base.weight.copy_(saved[0])
                if saved[1] is not None:
                    base.bias.copy_(saved[1])


def unload(transformer: torch.nn.Module) -> None:
    """:meth:`PixArtSigmaLoraLoaderMixin.unload_lora_weights` on a transformer: every LoRA layer replaced by its base layer.

    Fused updates stay in the weights, as in diffusers (fuse, unload, save: a model with the LoRA baked in).
    """
    for module_name, layer in _tuner_layers(transformer).items():
        parent_name, _, child = module_name.rpartition(".")
        parent = transformer.get_submodule(parent_name) if parent_name else transformer
        setattr(parent, child, layer.get_base_layer())
    transformer.__dict__.pop("peft_config", None)
    transformer.__dict__.pop(_FUSED_ATTRIBUTE, None)


# --- the pipeline methods ------------------------------------------------------------------------


def _transformer_of(pipe: Any) -> PixArtTransformer2DModel:
    transformer = getattr(pipe, COMPONENT, None)
    if not isinstance(transformer, PixArtTransformer2DModel):
        raise LoraApiError(
            f"{type(pipe).__name__} has no PixArtTransformer2DModel as its transformer; these LoRA methods are for PixArt pipelines"
        )
    return transformer


def _text_encoder_of(pipe: Any) -> torch.nn.Module:
    """The pipeline's text encoder, or an empty module where it has none (no LoRA layers: every method skips it)."""
    return getattr(pipe, "text_encoder", None) or torch.nn.Module()


def _follow(text_encoder: torch.nn.Module, names: Sequence[str], weights: Sequence[Any]) -> None:
    """The T5 parts follow the transformer's active set: those of ``names`` active, at their weight."""
    with _keeping_grad_flags(text_encoder):
        for layer in _tuner_layers(text_encoder).values():
            present = [(n, w) for n, w in zip(names, weights) if n in _adapters_of(layer)]
            layer.enable_adapters(bool(present))
            if present:
                layer.set_adapter([n for n, _ in present], inference_mode=True)
                for name, weight in present:
                    layer.set_scale(name, 1.0 if weight is None or isinstance(weight, Mapping) else float(weight))


class PixArtSigmaLoraLoaderMixin:
    """diffusers' pipeline LoRA methods (``LoraBaseMixin``) for PixArt pipelines: LoRAs go into ``self.transformer``."""

    _lora_loadable_modules = [COMPONENT]
    transformer_name = COMPONENT

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict: Any, adapter_name: str | None = None, hotswap: bool = False, **kwargs: Any) -> None:
        """Loads a LoRA into the transformer as ``adapter_name`` and makes it the one active adapter, at weight 1.0.

        The LoRA: a local folder or file in any layout pixart-tune reads, a hub
        repo id (with ``weight_name=`` for a file in it, ``subfolder=``,
        ``revision=``, ``cache_dir=``, ``token=``, ``local_files_only=``,
        ``force_download=``), a state dict or a ``LoraWeights``. Without
        ``adapter_name`` it is named ``default_0``, ``default_1`` ... A name in use
        raises ``ValueError``; the same file under two names loads twice.
        ``hotswap=True`` replaces the weights of the adapter ``adapter_name`` in
        place (same targets, ranks and alphas). Pickle files need ``allow_pickle=True``;
        ``source=`` names the LoRA in error messages (default: the path).
        """
        name = load(_transformer_of(self), pretrained_model_name_or_path_or_dict, adapter_name, hotswap, _text_encoder_of(self), **kwargs)
        _follow(_text_encoder_of(self), [name], [1.0])

    def set_adapters(self, adapter_names: str | list[str], adapter_weights: Any = None) -> None:
        """Makes exactly ``adapter_names`` active, each at its weight (default 1.0).

        ``adapter_weights``: one number for all, a list with one per adapter, and
        each may be ``None`` (1.0), ``{"transformer": w}``, or ``{"transformer":
        {"transformer_blocks.0": w, "attn2": w2}}`` per module (a key matches whole
        dotted parts of a layer's name; layers no key matches get 1.0). An unknown
        name or a list of another length raises ``ValueError``; ``[]`` runs the base model.
        """
        set_adapters(_transformer_of(self), adapter_names, adapter_weights)
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = adapter_weights if isinstance(adapter_weights, list) else [adapter_weights] * len(names)
        _follow(_text_encoder_of(self), names, weights)

    def get_active_adapters(self) -> list[str]:
        """The names of the active adapters (also while LoRA is disabled)."""
        return active_adapters(_transformer_of(self))

    def get_list_adapters(self) -> dict[str, list[str]]:
        """``{"transformer": [every loaded adapter]}``, or ``{}`` with none loaded."""
        lists = {COMPONENT: list_adapters(_transformer_of(self)), "text_encoder": list_adapters(_text_encoder_of(self))}
        return {component: names for component, names in lists.items() if names}

    def fuse_lora(
        self,
        components: Sequence[str] = (COMPONENT,),
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Adds ``adapter_names`` (default: the active adapters) at their weights times ``lora_scale`` into the base weights.

        Generation then runs at the base model's speed. ``safe_fusing`` refuses an
        update with NaNs. :meth:`unfuse_lora` undoes it exactly.
        """
        _check_components(components)
        fuse(_transformer_of(self), lora_scale, safe_fusing, adapter_names)

    def unfuse_lora(self, components: Sequence[str] = (COMPONENT,), **kwargs: Any) -> None:
        """Puts back the base weights as they were before :meth:`fuse_lora`, bit for bit, and each adapter's weight."""
        _check_components(components)
        unfuse(_transformer_of(self))

    def unload_lora_weights(self) -> None:
        """Removes every LoRA layer, leaving the transformer's own modules (with fused updates kept in them)."""
        unload(_transformer_of(self))
        unload(_text_encoder_of(self))

    def delete_adapters(self, adapter_names: list[str] | str) -> None:
        """Removes these adapters; names not loaded are skipped with a warning."""
        delete_adapters(_transformer_of(self), adapter_names)
        for name in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
            lora.remove(_text_encoder_of(self), name)

    def disable_lora(self) -> None:
        """Runs the base model until :meth:`enable_lora`; the active set and weights are kept."""
        set_enabled(_transformer_of(self), False)
        set_enabled(_text_encoder_of(self), False)

    def enable_lora(self) -> None:
        """Undoes :meth:`disable_lora`."""
        set_enabled(_transformer_of(self), True)
        set_enabled(_text_encoder_of(self), True)

    @property
    def fused_loras(self) -> set[str]:
        """Names of the adapters fused into the weights."""
        return fused_adapters(_transformer_of(self))

    @property
    def num_fused_loras(self) -> int:
        return len(self.fused_loras)


def _check_components(components: Sequence[str]) -> None:
    if not components:
        raise LoraApiError("`components` cannot be an empty list.")
    for component in components:
        if component != COMPONENT:
            raise LoraApiError(f"{component} is not found in self._lora_loadable_modules={[COMPONENT]}.")


API = tuple(name for name in vars(PixArtSigmaLoraLoaderMixin) if not name.startswith("__"))
"""The names the mixin gives a pipeline class."""


class PixArtSigmaLoraPipeline(PixArtSigmaLoraLoaderMixin, PixArtSigmaPipeline):
    """``PixArtSigmaPipeline`` with the LoRA methods; saves as a plain ``PixArtSigmaPipeline``."""

    def to_json_string(self) -> str:
        data = json.loads(super().to_json_string())
        data["_class_name"] = PixArtSigmaPipeline.__name__
        return json.dumps(data, indent=2, sort_keys=True) + "\n"


def install(pipeline_class: type = PixArtSigmaPipeline) -> bool:
    """Adds the LoRA methods to ``pipeline_class`` when it has none of them; True when it has ours now.

    All or nothing: a class with any of these names (a diffusers release with its
    own PixArt LoRA support) is left as it is, so two implementations never mix.
    """
    if all(vars(pipeline_class).get(name) is vars(PixArtSigmaLoraLoaderMixin)[name] for name in API):
        return True
    present = [name for name in API if hasattr(pipeline_class, name)]
    if present:
        logger.info("%s already has %s; its own LoRA methods are kept", pipeline_class.__name__, ", ".join(present))
        return False
    for name in API:
        setattr(pipeline_class, name, vars(PixArtSigmaLoraLoaderMixin)[name])
    return True


@functools.cache
def _with_lora(pipeline_class: type) -> type:
    # Same name and module: save_pretrained writes the class diffusers knows.
    return type(pipeline_class.__name__, (PixArtSigmaLoraLoaderMixin, pipeline_class), {"__module__": pipeline_class.__module__, "__qualname__": pipeline_class.__qualname__})


def enable_lora(pipe: Any) -> Any:
    """Gives ``pipe`` (a pipeline whose transformer is PixArt's) the LoRA methods; returns it.

    A pipeline whose class has them already (``PixArtSigmaPipeline`` once this
    module is imported) is returned as it is; another gets a subclass of its own
    class with the same name, so ``isinstance`` and ``save_pretrained`` are unchanged.
    """
    _transformer_of(pipe)
    if all(hasattr(type(pipe), name) for name in API):
        return pipe
    pipe.__class__ = _with_lora(type(pipe))
    return pipe


install()
# PixArt-alpha's pipeline runs the same transformer: its LoRAs (PixArt-LCM, the DMD
# one-step model) load the same way (diffusers issue #9887 asks for exactly this).
from diffusers import PixArtAlphaPipeline  # noqa: E402

install(PixArtAlphaPipeline)
