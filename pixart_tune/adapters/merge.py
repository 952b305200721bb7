"""Merge adapters, resize one by SVD, or fuse them into the base transformer.

The math is pure functions on canonical :class:`LoraModule` values:

* ``linear``: PEFT's ``add_weighted_adapter(combination_type="linear")``: A and B
  are weighted sums (sqrt of |weight x scale| on each side). Same rank out; exact
  for a single adapter or adapters on disjoint layers, otherwise an approximation
  (it adds cross terms B_i A_j), as in PEFT.
* ``cat``: A stacked, B side by side with weight x scale folded in: rank is the sum
  of ranks and the update is exactly sum_i w_i dW_i.
* ``svd``: the exact weighted sum sum_i w_i dW_i truncated to ``rank`` by SVD (the
  best rank-k approximation); exact when ``rank`` reaches the sum's rank.

The SVD never forms the out x in update: with up = Q_B R_B and down^T = Q_A R_A,
``up @ down = Q_B (R_B R_A^T) Q_A^T``, so only an r x r matrix is decomposed. A
Conv2d LoRA (the patch embedding ``pos_embed.proj``) is decomposed on its flattened
update (out x in*kh*kw) and reshaped back to PEFT's Conv2d LoRA shapes.

LyCORIS modules (LoKr, LoHa) have no common low-rank form with a LoRA, so they merge
as full updates: a layer only one adapter changes keeps its module (times the weight);
a layer several change gets the exact sum sum_i w_i dW_i as one full-update LoKr
(``kron([[1]], sum)``, the size of the layer's weight). ``svd`` (and ``--resize``)
turns every module into a plain LoRA of ``rank`` by SVD of its full update
(:func:`pixart_tune.adapters.lycoris.lora_from_delta`), the way to get a LoRA for tools
that read no LyCORIS. A result with LyCORIS modules is written as one flat file
(:data:`LYCORIS_FILE`, the ``diffusers`` layout ComfyUI core reads) in the output folder.
Fusing adds every update to the base weights through PEFT's own ``merge``.

Only the transformer's part of an adapter is merged, resized or fused; a T5 part
(OneTrainer files that trained the text encoder) is left out with a warning.
Merged files record their inputs by name (file or folder name, or hub id), never by
local path.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Sequence

import torch
from peft.utils.merge_utils import task_arithmetic
from safetensors.torch import save_file

from pixart_tune.adapters import checks, lora, lycoris
from pixart_tune.adapters.layouts import LoraModule, LoraWeights, original_name, to_state_dict
from pixart_tune.adapters.loader import AdapterSpec, apply_lora, parse_spec, read_lora, skip_text_encoder
from pixart_tune.errors import UserError
from pixart_tune.models import XL2_TRANSFORMER_CONFIG
from pixart_tune.base import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from pixart_tune.fsutil import atomic_path, refuse_unsafe_outputs
from pixart_tune.hub import looks_like_path

METHODS = ("cat", "svd", "linear")
LYCORIS_FILE = "adapter_lycoris.safetensors"
"""The file of a merged or resized adapter that holds LoKr / LoHa modules (read as a one-file folder)."""
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, LYCORIS_FILE)
"""What a merged or resized adapter folder holds: ``--overwrite`` replaces a folder of these only."""
OVERFLOW_ADVICE = "the weighted sum overflows float32: give smaller weights (ADAPTER:WEIGHT)"


# --- pure math -----------------------------------------------------------------------


class MixedRanks(UserError):
    """``linear`` was given adapters of different ranks (``ranks``); ``cat`` and ``svd`` take them."""

    def __init__(self, ranks: list[int]):
        self.ranks = ranks
        super().__init__(f"linear merging needs adapters of the same rank (got ranks {ranks}); use --method cat (exact) or --method svd")


def merge_linear(modules: Sequence[LoraModule], weights: Sequence[float]) -> LoraModule:
    """PEFT's linear combination: A = sum sign*sqrt|c_i| A_i, B = sum sqrt|c_i| B_i, c_i = w_i * scale_i."""
    if len({m.rank for m in modules}) != 1:
        raise MixedRanks(sorted({m.rank for m in modules}))
    factors = [w * m.scale for m, w in zip(modules, weights)]
    weights_a = torch.tensor([math.copysign(math.sqrt(abs(c)), c) for c in factors], dtype=torch.float64)
    weights_b = torch.tensor([math.sqrt(abs(c)) for c in factors], dtype=torch.float64)
    down = task_arithmetic([m.down.double() for m in modules], weights_a)
    up = task_arithmetic([m.up.double() for m in modules], weights_b)
    return LoraModule(down.float(), up.float(), float(down.shape[0]))


def merge_cat(modules: Sequence[LoraModule], weights: Sequence[float]) -> LoraModule:
    """Exact merge: stacked A, and B side by side scaled by weight x scale; alpha = rank."""
    down = torch.cat([m.down.float() for m in modules], dim=0)
    up = torch.cat([m.up.float() * (w * m.scale) for m, w in zip(modules, weights)], dim=1)
    return LoraModule(down, up, float(down.shape[0]))


def truncated_svd(up: torch.Tensor, down: torch.Tensor, rank: int) -> tuple[LoraModule, float, float]:
    """Best rank-``rank`` LoRA of ``up @ down``; returns (module, energy kept, total energy).

    Energy is the squared Frobenius norm, i.e. the sum of squared singular values;
    the kept fraction is what a rank-k truncation preserves of it. A Conv2d LoRA's
    (down rank x in x kh x kw, up out x rank x 1 x 1) comes back in those shapes.
    """
    up64, down64 = up.double().flatten(1), down.double().flatten(1)
    q_up, r_up = torch.linalg.qr(up64)
    q_down, r_down = torch.linalg.qr(down64.T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T)
    k = max(1, min(rank, s.numel()))
    total = float((s**2).sum())
    kept = float((s[:k] ** 2).sum())
    # B = U_k S_k, A = V_k^T: the convention of PEFT's and kohya's SVD merges.
    new_up = ((q_up @ u[:, :k]) * s[:k]).reshape(up.shape[0], k, *up.shape[2:])
    new_down = (vh[:k] @ q_down.T).reshape(k, *down.shape[1:])
    return LoraModule(new_down.float().contiguous(), new_up.float().contiguous(), float(k)), kept, total


def merge_svd(modules: Sequence[LoraModule], weights: Sequence[float], rank: int) -> tuple[LoraModule, float, float]:
    """sum_i w_i dW_i truncated to ``rank``; (module, energy kept, total energy)."""
    stacked = merge_cat(modules, weights)
    return truncated_svd(stacked.up * stacked.scale, stacked.down, rank)


@dataclasses.dataclass
class MergeResult:
    weights: LoraWeights
    energy_kept: float
    """Fraction of the update's squared Frobenius norm kept (1.0 for exact methods)."""


def merge_weights(adapters: Sequence[LoraWeights], weights: Sequence[float], method: str = "cat", rank: int | None = None) -> MergeResult:
    """Merges canonical adapters module by module (a module absent from one adapter is skipped there)."""
    if method not in METHODS:
        raise UserError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    if len(adapters) != len(weights):
        raise ValueError("one weight per adapter")
    for adapter in adapters:
        adapter.check_plain("merging")
    if method == "svd" and rank is not None and rank < 1:
        raise UserError(f"--rank must be at least 1, got {rank}")
    if any(adapter.lycoris for adapter in adapters):
        return _merge_full(adapters, weights, method, rank)
    names = sorted({name for adapter in adapters for name in adapter.modules})
    svd_rank = rank or max(r for adapter in adapters for r in adapter.ranks)
    merged: dict[str, LoraModule] = {}
    kept_total, energy_total = 0.0, 0.0
    for name in names:
        present = [(a.modules[name], w) for a, w in zip(adapters, weights) if name in a.modules]
        shapes = {m.weight_shape for m, _ in present}
        if len(shapes) > 1:
            raise UserError(f"the adapters disagree on the shape of {name} ({sorted(shapes)}): they were made for different base models")
        modules, ws = [m for m, _ in present], [w for _, w in present]
        if method == "linear":
            merged[name] = merge_linear(modules, ws)
        elif method == "cat":
            merged[name] = merge_cat(modules, ws)
        else:
            merged[name], kept, total = merge_svd(modules, ws, svd_rank)
            kept_total += kept
            energy_total += total
    energy = kept_total / energy_total if method == "svd" and energy_total > 0 else 1.0
    return MergeResult(LoraWeights(merged, {}, "peft"), energy)


def _merge_full(adapters: Sequence[LoraWeights], weights: Sequence[float], method: str, rank: int | None) -> MergeResult:
    """A merge with LoKr / LoHa modules (module docstring): full updates, or plain LoRAs of ``rank`` for ``svd``."""
    if method == "svd" and rank is None:
        ranks = [r for adapter in adapters for r in adapter.ranks]
        if not ranks:
            raise UserError("--method svd turns LoKr/LoHa into a LoRA and needs --rank (LoKr/LoHa have no LoRA rank to keep)")
        rank = max(ranks)
    plain, full, svd = {}, {}, {}
    for name in sorted({name for adapter in adapters for name in [*adapter.modules, *adapter.lycoris]}):
        present = [(a.modules.get(name) or a.lycoris[name], w) for a, w in zip(adapters, weights) if name in a.modules or name in a.lycoris]
        shapes = {tuple(_full_delta(name, m).shape) for m, _ in present}
        if len(shapes) > 1:
            raise UserError(f"the adapters disagree on the shape of {name} ({sorted(shapes)}): they were made for different base models")
        if method == "svd":
            svd[name] = sum(w * _full_delta(name, m) for m, w in present)
        elif all(isinstance(m, LoraModule) for m, _ in present):
            plain[name] = (merge_linear if method == "linear" else merge_cat)([m for m, _ in present], [w for _, w in present])
        elif len(present) == 1:
            module, w = present[0]
            field = "w1" if getattr(module, "w1", None) is not None else "w1_a"
            full[name] = dataclasses.replace(module, **{field: getattr(module, field).float() * w})
        else:
            full[name] = lycoris.LokrModule.from_delta(sum(w * _full_delta(name, m) for m, w in present))
    kept_total, energy_total = 0.0, 0.0
    for name, delta in svd.items():
        plain[name], kept, total = lycoris.lora_from_delta(delta, rank)
        kept_total, energy_total = kept_total + kept, energy_total + total
    return MergeResult(LoraWeights(plain, {}, "peft", lycoris=full), kept_total / energy_total if energy_total else 1.0)


def _full_delta(name: str, module: LoraModule | lycoris.LycorisModule) -> torch.Tensor:
    """A module's update shaped like its layer's weight: a LoKr/LoHa on the patch embedding read from a file
    with a flattened kernel (LyCORIS' conv ``w2_b``) gets back the conv shape (out, latent channels, k, k)."""
    delta = module.delta()
    if name == "pos_embed.proj" and delta.ndim == 2:
        channels = XL2_TRANSFORMER_CONFIG["in_channels"]
        kernel = math.isqrt(delta.shape[1] // channels)
        delta = delta.reshape(delta.shape[0], channels, kernel, kernel)
    return delta


def resize_weights(adapter: LoraWeights, rank: int) -> MergeResult:
    """Every module truncated to at most ``rank`` by SVD (LoKr / LoHa modules become plain LoRAs)."""
    adapter.check_plain("resizing")
    if rank < 1:
        raise UserError(f"rank must be at least 1, got {rank}")
    out, kept_total, energy_total = {}, 0.0, 0.0
    for name, module in adapter.modules.items():
        out[name], kept, total = truncated_svd(module.up * module.scale, module.down, rank)
        kept_total += kept
        energy_total += total
    for name, module in adapter.lycoris.items():
        out[name], kept, total = lycoris.lora_from_delta(_full_delta(name, module), rank)
        kept_total += kept
        energy_total += total
    return MergeResult(LoraWeights(out, dict(adapter.metadata), adapter.layout), kept_total / energy_total if energy_total else 1.0)


# --- files ---------------------------------------------------------------------------


def uniform(weights: LoraWeights) -> tuple[int, float, dict[str, torch.Tensor]]:
    """(rank, alpha, PEFT state dict) with one rank and alpha for every module.

    PEFT folders written by ``write_adapter`` carry a single r and alpha; modules of
    lower rank are padded with zero rows of A and zero columns of B (no change to the
    update) and differing scales are folded into B.
    """
    weights.check_plain("writing a PEFT adapter folder")
    rank = max(weights.ranks)
    # Keep the common alpha when the modules agree, so the file reads like the original.
    alphas = {m.alpha for m in weights.modules.values()}
    alpha = alphas.pop() if len(alphas) == 1 and len(weights.ranks) == 1 else float(rank)
    target_scale = alpha / rank
    state = {}
    for name, module in weights.modules.items():
        down = torch.zeros(rank, *module.down.shape[1:])
        up = torch.zeros(module.up.shape[0], rank, *module.up.shape[2:])
        down[: module.rank] = module.down.float()
        up[:, : module.rank] = module.up.float() * (module.scale / target_scale)
        state[f"{name}.lora_A.weight"] = down
        state[f"{name}.lora_B.weight"] = up
    return rank, alpha, state


def public_name(path: str | Path) -> str:
    """What a merged file records of an input: a hub id as given, else the file or folder name (never a local path)."""
    text = str(path)
    if text.count("/") == 1 and not looks_like_path(text) and not Path(text).exists():
        return text
    return Path(text).resolve().name


def flat_state(weights: LoraWeights, layout: str) -> dict[str, torch.Tensor]:
    """One flat state dict of the LoRA and LyCORIS modules of ``weights`` in ``layout`` (``diffusers`` or ``comfyui``).

    In ``comfyui`` q/k/v share one fused layer: a LoRA on a layer whose fused
    neighbour holds a LoKr/LoHa goes in with it as an exact full update.
    """
    modules, found = dict(weights.modules), dict(weights.lycoris)
    if layout == "comfyui":
        taken = {original_name(name)[0] for name in found}
        for name in [n for n in modules if original_name(n)[0] in taken]:
            found[name] = lycoris.LokrModule.from_delta(modules.pop(name).delta())
    state = to_state_dict(dataclasses.replace(weights, modules=modules, lycoris={}), layout) if modules else {}
    return {**state, **lycoris.to_comfyui_state(found, layout)}


def write_weights(weights: LoraWeights, out: str | Path, metadata: dict | None = None) -> Path:
    """Writes canonical weights as a PEFT adapter folder (one rank and alpha, alpha stored).

    With LyCORIS modules: a folder holding :data:`LYCORIS_FILE` (module docstring).
    """
    if weights.lycoris:
        header = {k: v if isinstance(v, str) else json.dumps(v) for k, v in {**weights.metadata, **(metadata or {})}.items()}
        with atomic_path(Path(out)) as tmp:
            tmp.mkdir()
            save_file(flat_state(weights, "diffusers"), str(tmp / LYCORIS_FILE), metadata={**header, "format": "pt"})
        return Path(out)
    rank, alpha, state = uniform(weights)
    targets = "|".join(re.escape(name) for name in sorted(weights.modules))
    settings = lora.LoraSettings(rank=rank, alpha=alpha, targets=targets)
    header = {k: v for k, v in weights.metadata.items() if k not in ("format", "lora_rank", "lora_alpha", "lora_targets")}
    header.update(metadata or {})
    return lora.write_adapter(out, state, settings, header)


def merge_adapters(specs: list[AdapterSpec], out: str | Path, method: str = "cat", rank: int | None = None, allow_pickle: bool = False) -> Path:
    """Merges adapters (``spec.scale`` is each one's weight) into a PEFT adapter folder at ``out``."""
    if not specs:
        raise UserError("give at least one adapter to merge")
    refuse_overwriting_inputs([spec.path for spec in specs], out)
    adapters = _read_transformer_parts(specs, allow_pickle, "a merged adapter holds the transformer's LoRA only")
    result = merge_weights(adapters, [spec.scale for spec in specs], method, rank)
    checks.require_finite(result.weights, "the merged adapter", OVERFLOW_ADVICE)
    metadata = {
        "merged_from": [{"name": public_name(s.path), "weight": s.scale} for s in specs],
        "merge_method": method,
        "energy_kept": round(result.energy_kept, 6),
    }
    trigger_words = sorted({w for a in adapters for w in _trigger_words(a.metadata)})
    if trigger_words:
        metadata["trigger_words"] = trigger_words
    return write_weights(result.weights, out, metadata)


def resize_adapter(path: str | Path, out: str | Path, rank: int, allow_pickle: bool = False) -> tuple[Path, float]:
    """Writes ``path``'s adapter truncated to ``rank`` at ``out``; returns (folder, fraction of energy kept)."""
    refuse_overwriting_inputs([path], out)
    [adapter] = _read_transformer_parts([AdapterSpec(str(path))], allow_pickle, "a resized adapter holds the transformer's LoRA only")
    result = resize_weights(adapter, rank)
    checks.require_finite(result.weights, "the resized adapter", OVERFLOW_ADVICE)
    folder = write_weights(result.weights, out, {"resized_from": public_name(path), "energy_kept": round(result.energy_kept, 6)})
    return folder, result.energy_kept


def fuse_adapters(model: str, specs: list[AdapterSpec], out: str | Path, dtype: str = "fp32", allow_pickle: bool = False) -> Path:
    """Fuses adapters (each at ``spec.scale``) into the base transformer; writes a full pipeline folder.

    The result loads with plain ``PixArtSigmaPipeline.from_pretrained(out)``. The
    text encoder, VAE, tokenizer and scheduler are linked (or copied) from the base
    model's folder unchanged; only ``transformer/`` is new.
    """
    from pixart_tune.base import resolve_dtype
    from pixart_tune.models import load_transformer

    if not specs:
        raise UserError("give at least one adapter to fuse")
    out = Path(out)
    source = _model_folder(model)
    refuse_overwriting_inputs([spec.path for spec in specs], out)
    refuse_overwriting_inputs([source], out, "the base model's folder")
    adapters = _read_transformer_parts(specs, allow_pickle, "the fused pipeline keeps the base model's T5")
    transformer = load_transformer(str(source), dtype=torch.float32)
    fuse_into(transformer, adapters, [spec.scale for spec in specs], [spec.path for spec in specs])
    for name, parameter in transformer.named_parameters():
        if not bool(torch.isfinite(parameter).all()):
            raise UserError(f"fusing makes {name} of the base model NaN or infinite: {OVERFLOW_ADVICE.split(': ', 1)[1]}; nothing was written")
    if resolve_dtype(dtype) != torch.float32:
        transformer.to(resolve_dtype(dtype))
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for item in source.iterdir():
            if item.name in ("transformer",) or item.name.startswith("."):
                continue
            _link_or_copy(item, tmp / item.name)
        transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
        (tmp / "fused_adapters.json").write_text(
            json.dumps({"base_model": public_name(model), "adapters": [{"name": public_name(s.path), "scale": s.scale} for s in specs]}, indent=2),
            encoding="utf-8",
        )
    return out


def _read_transformer_parts(specs: Sequence[AdapterSpec], allow_pickle: bool, why: str) -> list[LoraWeights]:
    adapters = [read_lora(spec.path, allow_pickle) for spec in specs]
    for spec, adapter in zip(specs, adapters):
        skip_text_encoder(adapter, spec.path, why)
    return adapters


def fuse_into(transformer: torch.nn.Module, adapters: Sequence[LoraWeights], scales: Sequence[float], sources: Sequence[str] | None = None) -> None:
    """Adds each adapter's update (times its scale) into the transformer's weights, in place.

    Goes through PEFT's own ``LoraLayer.merge`` (which also handles DoRA) and then
    puts the plain base layers back, so the model is a pristine diffusers model.
    """
    sources = sources or [f"adapter {i}" for i in range(len(adapters))]
    names = []
    for index, (adapter, scale, source) in enumerate(zip(adapters, scales, sources)):
        name = f"fuse_{index}"
        apply_lora(transformer, adapter, name, scale, source=source)
        names.append(name)
    for module_name, layer in list(lora.lora_layers(transformer).items()):
        active = [n for n in names if lora.has_adapter(layer, n)]
        if active:
            layer.merge(safe_merge=True, adapter_names=active)
        parent_name, _, child = module_name.rpartition(".")
        parent = transformer.get_submodule(parent_name) if parent_name else transformer
        setattr(parent, child, layer.get_base_layer())
    for parameter in transformer.parameters():
        parameter.requires_grad_(False)


def _model_folder(model: str) -> Path:
    path = Path(model)
    if path.is_dir():
        if not (path / "model_index.json").is_file() or not (path / "transformer").is_dir():
            raise UserError(f"{path} is not a diffusers PixArt-Sigma pipeline folder (needs model_index.json and transformer/)")
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model))
    except Exception as error:  # offline, unknown id, no access
        raise UserError(f"cannot find the base model {model!r} as a folder or in the Hugging Face cache: {error}") from error


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard links keep a fused copy of a 20 GB pipeline from doubling the disk use."""
    if source.is_dir():
        target.mkdir()
        for child in source.iterdir():
            _link_or_copy(child, target / child.name)
        return
    real = source.resolve()
    try:
        os.link(real, target)
    except OSError:
        shutil.copy2(real, target)


def refuse_overwriting_inputs(inputs: Sequence[str | Path], out: str | Path, what: str = "one of the input adapters", kind: str = "folder") -> None:
    """Refuses an output that is, holds or lies inside an input (:func:`pixart_tune.fsutil.refuse_unsafe_outputs`;
    whether it may replace what exists is the caller's to check)."""
    refuse_unsafe_outputs([out], [(item, what) for item in inputs], overwrite=True, kind=kind)


def _trigger_words(metadata: dict[str, str]) -> list[str]:
    raw = metadata.get("trigger_words") or metadata.get("trigger_word") or ""
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, TypeError):
        value = raw
    if isinstance(value, str):
        return [w.strip() for w in value.split(",") if w.strip()]
    return [str(w) for w in value]


# --- the ``merge`` verb -------------------------------------------------------------------


@dataclasses.dataclass
class MergeConfig:
    """What ``pixart-tune merge`` does: merge several adapters, resize one, or fuse into the base model."""

    adapters: list[str]
    """Adapter folders or .safetensors files in any supported layout, each PATH or PATH:WEIGHT."""
    out: str
    """Output folder: an adapter folder, or a pipeline folder with fuse."""
    method: str = "cat"
    """How to merge several adapters: cat (exact, ranks add up; the default), svd (exact sum truncated to rank) or linear (PEFT's weighted A and B: same ranks, adds cross terms)."""
    rank: int | None = None
    """Rank of an svd merge (default: the largest input rank)."""
    resize: int | None = None
    """Resize the one adapter given to this rank by SVD."""
    fuse: str | None = None
    """Fuse the adapters into this base model and write a full pipeline folder."""
    dtype: str = "fp32"
    """Weight dtype of a fused transformer: fp32, bf16 or fp16."""
    overwrite: bool = False
    """Replace the output if it exists."""
    allow_pickle_runs_code: bool = False
    """Also read .bin/.pt/.ckpt files; unpickling can run any code in them."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for field in ("rank", "resize"):
            if getattr(self, field) is not None and getattr(self, field) < 1:
                raise ValueError(f"{field} must be at least 1, got {getattr(self, field)}")


@dataclasses.dataclass
class MergeOutcome:
    folder: Path
    """What was written: an adapter folder, or a pipeline folder for fuse."""
    summary: str
    """One line saying what it is."""
    notes: list[str] = dataclasses.field(default_factory=list)
    """Things worth knowing about the request (e.g. one adapter given to a merge)."""


def merge(config: MergeConfig) -> MergeOutcome:
    """Runs ``config``: a resize, a fuse or a merge, refusing to replace an output unless asked."""
    specs = [parse_spec(text) for text in config.adapters]
    if config.resize is not None and config.fuse:
        raise UserError("--resize and --fuse are separate operations; run them one after the other")
    out = Path(config.out)
    inputs = [(spec.path, "one of the input adapters") for spec in specs]
    own: set[str] = set(ADAPTER_FILES)
    if config.fuse:
        source = _model_folder(config.fuse)
        inputs.append((source, "the base model's folder"))
        own = {item.name for item in source.iterdir() if not item.name.startswith(".")} | {"transformer", "fused_adapters.json"}
    refuse_unsafe_outputs([out], inputs, overwrite=config.overwrite, kind="folder", own=own)
    if config.resize is not None:
        if len(specs) != 1:
            raise UserError("--resize takes exactly one adapter")
        folder, energy = resize_adapter(specs[0].path, out, config.resize, config.allow_pickle_runs_code)
        return MergeOutcome(folder, f"wrote {folder} at rank {config.resize}: {energy:.2%} of the update's energy kept")
    if config.fuse:
        folder = fuse_adapters(config.fuse, specs, out, config.dtype, config.allow_pickle_runs_code)
        return MergeOutcome(folder, f"wrote the fused pipeline {folder}; load it with PixArtSigmaPipeline.from_pretrained({str(folder)!r})")
    notes = []
    if len(specs) < 2 and config.method != "svd":
        notes.append("note: one adapter given; the result is that adapter scaled by its weight")
    folder = merge_adapters(specs, out, config.method, config.rank, config.allow_pickle_runs_code)
    merged = read_lora(folder)
    energy = float(merged.metadata.get("energy_kept", 1.0))
    what = f"rank {max(merged.ranks)}" if merged.ranks else ""
    if merged.lycoris:
        what = f"{what + ' LoRA and ' if what else ''}{len(merged.lycoris)} LoKr/LoHa modules (full updates where adapters overlap)"
    return MergeOutcome(folder, f"wrote {folder} ({config.method}, {what}, {energy:.2%} of the update's energy kept)", notes)
