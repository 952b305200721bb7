"""Load PixArt-Sigma LoRAs of any layout onto a transformer (and T5), several at once.

``read_lora`` turns a path (a PEFT adapter folder or one ``.safetensors`` file in
any layout of :mod:`pixart_tune.adapters.layouts`) into canonical
:class:`~pixart_tune.adapters.layouts.LoraWeights`; ``check_fits`` refuses weights
made for another base with a message naming what does not match; ``apply_lora``
injects them through PEFT under an adapter name (``apply_text_lora`` does the same
for the T5 part of a file that also trained the text encoder); ``load_adapters``
does all of it for a list of (path, scale) specs and activates exactly those.

Where a module's alpha comes from, first found wins (:func:`alpha_source` finds
sources 2 to 6 for the modules without source 1; ``LoraWeights.alpha_source`` says
which applied):

1. its ``<module>.alpha`` tensor in the file (kohya, OneTrainer's LEGACY, COMFY and
   ORIGINAL formats, ComfyUI, this toolkit's exports);
2. the safetensors header ``lora_adapter_metadata``: the PEFT LoraConfig as JSON,
   keys prefixed by component (``{"transformer.r": 4, "transformer.lora_alpha": 16}``),
   as diffusers' ``save_lora_weights(..., transformer_lora_adapter_metadata=)`` and
   SimpleTuner write it; r, lora_alpha, rank_pattern, alpha_pattern and use_rslora
   apply as PEFT applies them when diffusers loads the file;
3. the header of a OneTrainer file (``ot_revision``): without alpha tensors it is
   OneTrainer's DIFFUSERS format, whose alpha is folded into lora_B (scale 1);
4. the header keys ``lora_alpha`` (this toolkit) and ``ss_network_alpha`` (kohya);
5. a JSON beside the file: ``<stem>.json``, ``<stem>.config.json`` or
   ``adapter_config.json`` (``lora_alpha`` or ``alpha``; a PEFT config applies whole);
6. ``adapter_config.json`` one folder up, for a file in ``transformer_lora/`` (the
   PixArt-sigma LoRA script saves its PEFT folder there and the file without alpha);
7. nowhere: alpha = rank (scale 1), as ComfyUI and diffusers assume, and a warning
   that the file's strength is a guess.

A PEFT adapter folder takes everything from its ``adapter_config.json``.

LyCORIS (LoKr, LoHa) reads into ``LoraWeights.lycoris`` (:mod:`pixart_tune.adapters.lycoris`):
flat files in any naming, the LyCORIS part of a mixed file, and PEFT folders whose
``adapter_config.json`` says ``peft_type`` LOKR or LOHA. A LyCORIS module carries its own
alpha (none: scale 1, LyCORIS' rule, not a guess). ``apply_lora`` injects it through PEFT
under the same adapter name as the file's LoRA part, so one name switches and scales both.

Only safetensors is read by default. Pickle-based files (``.bin``, ``.pt``,
``.ckpt``) can execute arbitrary code when loaded, so they are refused unless the
caller passes ``allow_pickle=True`` (the CLI's ``--allow-pickle-runs-code``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import warnings
from pathlib import Path
from typing import Sequence

import torch
from peft import LoraConfig
from peft.functional import cast_adapter_dtype, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lokr.layer import LoKrLayer
from peft.tuners.lora import LoraLayer
from safetensors import safe_open

from pixart_tune.adapters import checks, lora, lycoris
from pixart_tune.adapters.layouts import (
    NO_ALPHA,
    PREFIXES,
    AlphaSource,
    LoraModule,
    LoraWeights,
    from_state_dict,
    pixart_module_names,
)
from pixart_tune.base import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from pixart_tune.errors import UserError

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# diffusers' LORA_ADAPTER_METADATA_KEY: the header key of the PEFT config as JSON.
ADAPTER_METADATA_KEY = "lora_adapter_metadata"


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
        checks.finite_scale(self.scale, self.path)


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
    """Canonical weights of the LoRA at ``path`` (folder or file, any supported layout).

    A problem with the file is a :class:`UserError` whose message names it.
    """
    path = Path(path)
    try:
        weights = _read(path, allow_pickle)
        checks.require_finite(weights, path)
        return weights
    except UserError as error:
        message = str(error)
        raise UserError(message if str(path) in message else f"{path}: {message}") from error


def _read(path: Path, allow_pickle: bool) -> LoraWeights:
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
    return _from_flat(state, metadata, path)


def _read_folder(path: Path, allow_pickle: bool) -> LoraWeights:
    config_file = path / ADAPTER_CONFIG
    weights = path / ADAPTER_WEIGHTS
    if config_file.is_file() and weights.is_file():
        state, metadata = _read_safetensors(weights)
        # PEFT's save_pretrained writes base_model.model.<module>; older PixArt scripts
        # unet.base_model.model.; diffusers-style tools transformer. The config
        # (rsLoRA, rank and alpha patterns) applies to the module names behind them.
        return _from_peft(_strip_prefixes(state), _json(config_file), metadata)
    if config_file.is_file() and (path / "adapter_model.bin").is_file():
        return _read_pickle(path / "adapter_model.bin", allow_pickle, config_file)
    files = sorted(path.glob("*.safetensors"))
    if len(files) == 1:
        return _read(files[0], allow_pickle)
    raise UserError(
        f"{path} is not an adapter folder: it needs {ADAPTER_WEIGHTS} + {ADAPTER_CONFIG}, or exactly one .safetensors file "
        f"(found {len(files)}); pass the file itself"
    )


def _from_peft(state: dict[str, torch.Tensor], config: dict, metadata: dict[str, str]) -> LoraWeights:
    """Canonical weights of a PEFT state dict (prefixes stripped) scaled by its ``adapter_config.json``."""
    if str(config.get("peft_type", "")).upper() in ("LOKR", "LOHA"):
        found = lycoris.read_peft_lycoris(state, config, _module_names(state))
        return LoraWeights({}, metadata, "peft", alpha_source=ADAPTER_CONFIG, lycoris=found)
    modules = {}
    for key, down in state.items():
        if key.endswith(".lora_A.weight"):
            name = key[: -len(".lora_A.weight")]
            up = state.get(f"{name}.lora_B.weight")
            if up is None:
                raise UserError(f"adapter has lora_A but no lora_B weight for {name}")
            modules[name] = LoraModule(down, up, lora.peft_alpha(config, name, down.shape[0]))
    if not modules:
        raise UserError("the adapter folder holds no LoRA weights")
    dora = {k.rsplit(".lora_magnitude_vector", 1)[0]: v.float().flatten() for k, v in state.items() if ".lora_magnitude_vector" in k}
    return LoraWeights(modules, metadata, "peft", dora, alpha_source=ADAPTER_CONFIG)


# The prefixes a PEFT folder's keys carry, by the tool that saved it.
_PEFT_PREFIXES = tuple(PREFIXES[layout] for layout in ("peft-unet", "peft-model", "diffusers"))


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {next((key[len(p) :] for p in _PEFT_PREFIXES if key.startswith(p)), key): tensor for key, tensor in state.items()}


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    checks.regular_file(path)
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
        return _from_peft(_strip_prefixes(state), _json(config_file), {})
    return _from_flat(state, {}, path)


def _module_names(state: dict[str, torch.Tensor]) -> list[str]:
    """Diffusers names of a PixArt-Sigma transformer with as many blocks as the keys reach."""
    blocks = [int(m.group(1)) for k in state for m in [re.search(r"(?:transformer_)?blocks[._](\d+)[._]", k)] if m]
    return pixart_module_names(max(blocks, default=-1) + 1)


def _from_flat(state: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> LoraWeights:
    weights = from_state_dict(state, _module_names(state), alpha_source(path, metadata), metadata)
    if weights.alpha_guessed or (weights.text_encoder and weights.text_encoder.alpha_guessed):
        logger.warning(
            "%s stores no alpha (no .alpha tensors, header or adapter_config.json): it applies at alpha = rank "
            "(scale 1), as ComfyUI and diffusers assume, so its strength is a guess; put its training alpha in "
            "%s as {\"lora_alpha\": ...} if you know it", path, path.with_suffix(".json").name,
        )
    return weights


def alpha_source(path: Path, header: dict[str, str]) -> AlphaSource:
    """The alpha of the modules of ``path`` that carry no ``.alpha`` tensor: sources 2 to 7 of the module docstring."""
    if ADAPTER_METADATA_KEY in header:
        return AlphaSource(f"the {ADAPTER_METADATA_KEY} header", configs=_adapter_metadata(header[ADAPTER_METADATA_KEY]))
    if "ot_revision" in header or "ot_branch" in header:
        return AlphaSource("folded into lora_B (OneTrainer's DIFFUSERS format)")
    for key in ("lora_alpha", "ss_network_alpha"):
        value = _number(header.get(key))
        if value is not None:
            return AlphaSource(f"the {key} header", alpha=value)
    beside = [path.with_suffix(".json"), path.with_name(f"{path.stem}.config.json"), path.with_name(ADAPTER_CONFIG)]
    places = [(file, f"{file.name} beside it") for file in beside]
    if path.parent.name == "transformer_lora":
        places.append((path.parent.parent / ADAPTER_CONFIG, f"{ADAPTER_CONFIG} one folder up"))
    for file, where in places:
        if not file.is_file():
            continue
        try:
            data = _json(file)
        except UserError as error:
            logger.warning("ignoring %s for the alpha: %s", file, error)
            continue
        if "peft_type" in data or ("r" in data and "lora_alpha" in data):
            return AlphaSource(where, configs={"": data})
        value = _number(data.get("lora_alpha", data.get("alpha")))
        if value is not None:
            return AlphaSource(where, alpha=value)
    return AlphaSource(NO_ALPHA)


def _adapter_metadata(raw: str) -> dict[str, dict]:
    """diffusers' ``lora_adapter_metadata`` header as LoraConfig fields per component (``transformer.r`` -> r)."""
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as error:
        raise UserError(
            f"its '{ADAPTER_METADATA_KEY}' header is not valid JSON ({error}), so its alpha cannot be read; "
            "re-save the file with the tool that wrote it"
        ) from error
    if not isinstance(data, dict):
        raise UserError(f"its '{ADAPTER_METADATA_KEY}' header is not a JSON object of LoraConfig fields")
    configs: dict[str, dict] = {}
    for key, value in data.items():
        component, _, field = key.rpartition(".")
        configs.setdefault(component, {})[field] = value
    for component, config in configs.items():
        for field in ("r", "lora_alpha"):
            if field in config and _number(config[field]) is None:
                raise UserError(f"its '{ADAPTER_METADATA_KEY}' header gives {component}.{field} = {config[field]!r}, not a number")
        checks.lora_config(config, f"its '{ADAPTER_METADATA_KEY}' header ({component or 'no component'})")
    return configs


def _number(value) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path} is not readable JSON ({error}); fix it, or write it again with the tool that made the adapter") from error
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object of adapter settings but a JSON {type(data).__name__}; fix it, or write it again")
    return checks.lora_config(data, path)


# --- fitting and applying -------------------------------------------------------------


def check_fits(model: torch.nn.Module, weights: LoraWeights, source: str = "adapter") -> None:
    """Refuses weights that do not fit ``model`` (the transformer, or T5 for a text-encoder part), naming the first mismatch."""
    layers = dict(_adaptable_layers(model))
    names = list(weights.modules) + [name for group in weights.dora_inputs for name in group.parts]
    missing = [name for name in names if name not in layers]
    if missing:
        t5 = any(".SelfAttention." in name for name in layers)
        blocks = sum(1 for name in layers if name.endswith(("attn1.to_q", "SelfAttention.q")))
        raise UserError(
            f"{source}: {len(missing)} of {len(names)} LoRA modules have no layer in this model (e.g. {missing[0]}; "
            f"the model has {blocks} {'T5' if t5 else 'transformer'} blocks); it was made for a different base model"
        )
    for name, module in weights.modules.items():
        layer = layers[name]
        want, have = tuple(layer.weight.shape), module.weight_shape
        if isinstance(layer, torch.nn.Conv2d) != (len(have) == 4):
            kinds = ("a Conv2d", "a linear layer") if len(have) == 4 else ("a linear", "a Conv2d")
            raise UserError(f"{source}: the LoRA for {name} is {kinds[0]} LoRA but this model's layer is {kinds[1]}; it was made for another model")
        if want != have and len(want) == 4:
            raise UserError(
                f"{source}: the Conv2d LoRA for {name} has a {have[2]}x{have[3]} kernel over {have[1]} -> {have[0]} channels "
                f"but this model's layer has a {want[2]}x{want[3]} kernel over {want[1]} -> {want[0]} channels; "
                "it was made for a different base model (another patch size or width)"
            )
        if want != have:
            raise UserError(
                f"{source}: LoRA for {name} maps {have[1]} -> {have[0]} features but this model's layer maps "
                f"{want[1]} -> {want[0]}; it was made for a different base model (another width)"
            )
    for name, magnitude in weights.dora_magnitudes.items():
        if name in layers and magnitude.numel() != layers[name].weight.shape[0]:
            raise UserError(f"{source}: the DoRA magnitude of {name} has {magnitude.numel()} values for {layers[name].weight.shape[0]} outputs")
    for group in weights.dora_inputs:
        inputs = layers[group.parts[0]].weight.shape[1]
        if group.magnitude.numel() != inputs:
            raise UserError(f"{source}: the DoRA magnitude of {group.parts[0]} has {group.magnitude.numel()} values for {inputs} inputs")
    both = sorted(set(weights.modules) & set(weights.lycoris))
    if both:
        raise UserError(f"{source}: {both[0]} has both a LoRA and a LoKr/LoHa module in one file; PEFT holds one kind per layer and adapter")
    try:
        lycoris.fit_shapes(weights.lycoris, model)
    except UserError as error:
        raise UserError(f"{source}: {error}") from None


def _adaptable_layers(model: torch.nn.Module):
    """(name, base layer) of every Linear and Conv2d a LoRA can target, PEFT wrappers seen through."""
    kinds = (torch.nn.Linear, torch.nn.Conv2d)
    for name, module in model.named_modules():
        base = getattr(module, "base_layer", None)
        if isinstance(base, kinds):
            yield name, base
        elif isinstance(module, kinds) and ".lora_" not in name and ".base_layer" not in name and not name.endswith(("lora_A", "lora_B")):
            yield name, module


def peft_config(weights: LoraWeights) -> LoraConfig:
    """A LoraConfig that reproduces each module's rank and alpha exactly (a Conv2d target gets PEFT's Conv2d LoRA)."""
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
    """Injects ``weights`` into ``transformer`` as a new, frozen ``adapter_name`` (fp32 LoRA weights) at ``scale``.

    Only the transformer's part: a text-encoder part goes into T5 with :func:`apply_text_lora`.
    """
    _inject(transformer, weights, adapter_name, scale, source)


def apply_text_lora(text_encoder: torch.nn.Module, weights: LoraWeights, adapter_name: str, scale: float = 1.0, source: str = "adapter") -> bool:
    """Injects the T5 part of ``weights`` into a transformers ``T5EncoderModel`` as ``adapter_name``; False when there is none."""
    if weights.text_encoder is None:
        return False
    _inject(text_encoder, weights.text_encoder, adapter_name, scale, f"{source} (its text-encoder part)")
    return True


def skip_text_encoder(weights: LoraWeights, source: str, why: str) -> None:
    """Warns that the T5 part of ``weights`` is left out, for callers without a text encoder."""
    if weights.text_encoder is not None:
        logger.warning("%s: the text-encoder (T5) part of this LoRA is not applied: %s", source, why)


def _inject(model: torch.nn.Module, weights: LoraWeights, adapter_name: str, scale: float, source: str) -> None:
    check_fits(model, weights, source)
    if weights.dora_inputs:
        layers = dict(_adaptable_layers(model))
        weights = resolve_input_dora(weights, {name: layers[name].weight for group in weights.dora_inputs for name in group.parts})
    if weights.dora_magnitudes and set(weights.dora_magnitudes) != set(weights.modules):
        raise UserError(f"{source}: {len(weights.dora_magnitudes)} of its {len(weights.modules)} modules are DoRA; PEFT applies DoRA to all of an adapter's modules or none")
    if weights.modules:
        with warnings.catch_warnings():
            # Several adapters in one model is the point here, not an accident.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            inject_adapter_in_model(peft_config(weights), model, adapter_name=adapter_name)
        # PEFT makes the LoRA layers in the base layer's dtype and device; upcast before
        # loading, or fp32 weights copied into bf16 layers would be rounded.
        cast_adapter_dtype(model, adapter_name=adapter_name)
        _load_state(model, dataclasses.replace(weights, lycoris={}), adapter_name, source)
    if weights.lycoris:
        lycoris.inject(model, weights.lycoris, adapter_name)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    lora.set_scale(model, adapter_name, scale)


def resolve_input_dora(weights: LoraWeights, base_weights: dict[str, torch.Tensor]) -> LoraWeights:
    """``weights`` with each per-input DoRA group (OneTrainer's default) as plain LoRAs of its exact weight change.

    ``W' = (W + dW) * m / ||W + dW||`` with column norms (the rows of a fused
    layer's parts together, a Conv2d's kernel positions too, plus OneTrainer's fp32
    ``norm_epsilon``), as OneTrainer's ``DoRAModule.forward`` computes it. PEFT's DoRA
    normalises rows, so ``W' - W`` is written as a full-rank LoRA (rank min(out, in)):
    exact at scale 1, and ``W + s (W' - W)`` at scale s, ComfyUI's strength rule for DoRA.
    """
    if not weights.dora_inputs:
        return weights
    modules = dict(weights.modules)
    for group in weights.dora_inputs:
        base = {name: base_weights[name].detach().float() for name in group.parts}
        patched = {name: base[name] + modules[name].delta().to(base[name].device) for name in group.parts}
        squares = sum(w.transpose(0, 1).reshape(w.shape[1], -1).square().sum(dim=1) for w in patched.values())
        factor = group.magnitude.to(squares.device).float() / (squares.sqrt() + torch.finfo(torch.float32).eps)
        for name, weight in patched.items():
            modules[name] = full_rank((weight * factor.view(1, -1, *[1] * (weight.ndim - 2)) - base[name]).cpu())
    return dataclasses.replace(weights, modules=modules, dora_inputs=[])


def full_rank(delta: torch.Tensor) -> LoraModule:
    """A LoRA whose update is exactly ``delta`` (rank min(out, in x kh x kw), alpha = rank)."""
    out, flat = delta.shape[0], delta.reshape(delta.shape[0], -1)
    tail = (1, 1) if delta.ndim == 4 else ()
    if out <= flat.shape[1]:
        down, up = flat.reshape(delta.shape), torch.eye(out).reshape(out, out, *tail)
    else:
        size = flat.shape[1]
        down, up = torch.eye(size).reshape(size, *delta.shape[1:]), flat.reshape(out, size, *tail)
    return LoraModule(down.contiguous(), up.contiguous(), float(down.shape[0]))


def mismatches(transformer: torch.nn.Module, weights: LoraWeights, adapter_name: str = "default") -> list[str]:
    """How ``weights`` differ from the adapter ``adapter_name`` already injected: type, targets, rank (LoKr / LoHa:
    tensor shapes), scale, DoRA.

    Empty when :func:`load_into` can load them exactly. A training run's own LoRA
    (resumed, or started from a stage-1 adapter) must be the same shape as the file.
    """
    every = {name: layer for name, layer in lora.lora_layers(transformer).items() if lora.has_adapter(layer, adapter_name)}
    layers = {name: layer for name, layer in every.items() if isinstance(layer, LoraLayer)}
    others = {name: layer for name, layer in every.items() if name not in layers}
    have, want = _types(weights.lycoris.values(), weights.modules), _types(others.values(), layers)
    problems = [f"type={'+'.join(have)} (recipe: {'+'.join(want)})"] if want and have != want else []
    problems += _lycoris_mismatches(others, weights, adapter_name)
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
    if weights.dora_inputs:
        problems.append("dora on the input axis (OneTrainer's default), which PEFT cannot train")
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
    skip_text_encoder(weights, source, "training here trains the transformer's LoRA only")
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
        # PEFT keeps a Conv2d's magnitude as (1, out, 1, 1), a linear layer's as (out,).
        shape = transformer.get_submodule(name).lora_magnitude_vector[adapter_name].weight.shape
        state[f"{name}.lora_magnitude_vector"] = magnitude.float().reshape(shape)
    for name, module in weights.lycoris.items():
        tensors = lycoris.peft_tensors(module)
        if module.rank is None:  # both LoKr halves full: its scale is in w1, the layer's own scale is applied too
            tensors["lokr_w1"] = tensors["lokr_w1"] / transformer.get_submodule(name).scaling[adapter_name]
        state.update({f"{name}.{key}": value for key, value in tensors.items()})
    result = set_peft_model_state_dict(transformer, state, adapter_name=adapter_name)
    unexpected = [k for k in result.unexpected_keys if any(f".{p}" in k for p in ("lora_", "lokr_", "hada_"))]
    if unexpected:
        raise UserError(f"{source}: LoRA weights match no layer of this model: {', '.join(unexpected[:3])}")


def _lycoris_mismatches(layers: dict, weights: LoraWeights, adapter_name: str) -> list[str]:
    """:func:`mismatches` for the LoKr / LoHa part: type, targets, tensor shapes (rank, factor) and scale."""
    problems = []
    outside, lacking = sorted(set(weights.lycoris) - set(layers)), sorted(set(layers) - set(weights.lycoris))
    if weights.lycoris and outside:
        problems.append(f"targets: {len(outside)} of its LoKr/LoHa modules are not targeted here (e.g. {outside[0]})")
    if lacking:
        problems.append(f"targets: {len(lacking)} targeted LoKr/LoHa modules are not in it (e.g. {lacking[0]})")
    for name in sorted(set(weights.lycoris) & set(layers)):
        module, layer = weights.lycoris[name], layers[name]
        have = {key: tuple(value.shape) for key, value in lycoris.peft_tensors(module).items()}
        want = {key: tuple(getattr(layer, key)[adapter_name].shape) for key in layer.adapter_layer_names if adapter_name in getattr(layer, key)}
        if have != want:
            kind = "LoKr" if any(k.startswith("lokr") for k in want) else "LoHa"
            problems.append(f"{kind} tensors {_shapes(have)} (recipe: {_shapes(want)}; another type, rank or factor)")
        elif module.rank is not None and not math.isclose(module.scale, layer.scaling[adapter_name], rel_tol=1e-6):
            problems.append(f"alpha/rank scale={module.scale:g} (recipe: {layer.scaling[adapter_name]:g})")
    return problems


def _types(modules, lora_modules) -> list[str]:
    """lokr / loha of LyCORIS modules or PEFT layers, and lora when ``lora_modules`` is not empty."""
    names = {"lokr" if isinstance(m, (LoKrLayer, lycoris.LokrModule)) else "loha" for m in modules}
    return sorted(names | ({"lora"} if lora_modules else set()))


def _shapes(shapes: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{key} {'x'.join(map(str, shape))}" for key, shape in sorted(shapes.items()))


def load_adapters(
    transformer: torch.nn.Module,
    specs: Sequence[AdapterSpec],
    allow_pickle: bool = False,
    prefix: str = "adapter",
    text_encoder: torch.nn.Module | None = None,
) -> list[str]:
    """Applies every spec with its own scale and activates exactly those; returns the adapter names.

    A file's T5 part goes into ``text_encoder`` under the same name, or is left out
    with a warning when no text encoder is given.
    """
    names, text_names = [], []
    for index, spec in enumerate(specs):
        name = f"{prefix}_{index}"
        weights = read_lora(spec.path, allow_pickle)
        lora.remove(transformer, name)
        apply_lora(transformer, weights, name, spec.scale, source=spec.path)
        names.append(name)
        if text_encoder is None:
            skip_text_encoder(weights, spec.path, "no text encoder was given to apply it to")
            continue
        lora.remove(text_encoder, name)
        if apply_text_lora(text_encoder, weights, name, spec.scale, source=spec.path):
            text_names.append(name)
    lora.activate(transformer, names)
    if text_encoder is not None:
        lora.activate(text_encoder, text_names)
    return names
