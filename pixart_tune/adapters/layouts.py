"""LoRA key layouts for PixArt-Sigma: detect them, and convert to and from one canonical form.

The canonical form, :class:`LoraWeights`, holds per diffusers module name
(``transformer_blocks.0.attn1.to_q``) a down matrix A (r x in), an up matrix B
(out x r) and its alpha, so the update is ``alpha / r * B @ A``. Every layout
people produce reads into it and writes out of it:

==============  ==========================================================================  =========================
layout          keys                                                                        written by / loaded by
==============  ==========================================================================  =========================
``peft``        ``transformer_blocks.0.attn1.to_q.lora_A.weight`` (+ ``adapter_config.json``)  PEFT, this toolkit
``diffusers``   ``transformer.transformer_blocks.0.attn1.to_q.lora_A.weight`` + ``.alpha``   diffusers scripts; ComfyUI
``peft-model``  ``base_model.model.<name>.lora_A.weight``                                   PEFT ``save_pretrained``
``peft-unet``   ``unet.base_model.model.<name>.lora_A.weight``                              the old PixArt LoRA script
``onetrainer``  ``lora_transformer_transformer_blocks_0_attn1_to_q.lora_down.weight``       OneTrainer, kohya-style
``comfyui``     ``diffusion_model.blocks.0.attn.qkv.lora_down.weight`` (fused q/k/v)         ComfyUI core
``pixart``      ``blocks.0.attn.qkv.lora_down.weight`` (fused q/k/v, original names)       original PixArt, older city96
==============  ==========================================================================  =========================

Reading also accepts any of these prefixes with either suffix pair
(``lora_A``/``lora_B`` or ``lora_down``/``lora_up``) and ``lora_unet_`` + underscored
original names. The original PixArt checkpoint fuses self-attention q, k, v into
one ``attn.qkv`` linear and cross-attention k, v into ``cross_attn.kv_linear``; a
LoRA on the separate layers is written there exactly, as stacked A matrices and a
block-diagonal B, and a fused LoRA reads back as one LoRA per part.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import Iterable

import torch

from pixart_tune.errors import UserError

logger = logging.getLogger(__name__)

LAYOUTS = ("peft", "diffusers", "peft-model", "peft-unet", "onetrainer", "comfyui", "pixart")

# Layout -> prefix it puts before the module name.
PREFIXES = {
    "diffusers": "transformer.",
    "peft-model": "base_model.model.",
    "peft-unet": "unet.base_model.model.",
    "comfyui": "diffusion_model.",
}
UNDERSCORED_PREFIXES = {"onetrainer": "lora_transformer_", "kohya-original": "lora_unet_"}

_SUFFIXES = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".alpha": "alpha",
}

# Parts of a fused original layer: original name -> diffusers names, in row order.
_FUSED = {
    "attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "cross_attn.kv_linear": ("attn2.to_k", "attn2.to_v"),
}
# Original name -> diffusers name inside a block (``blocks.N`` -> ``transformer_blocks.N``).
_BLOCK_NAMES = {
    "attn.proj": "attn1.to_out.0",
    "cross_attn.q_linear": "attn2.to_q",
    "cross_attn.proj": "attn2.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}
# Original name -> diffusers name outside the blocks.
_OUTER_NAMES = {
    "t_block.1": "adaln_single.linear",
    "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
    "csize_embedder.mlp.0": "adaln_single.emb.resolution_embedder.linear_1",
    "csize_embedder.mlp.2": "adaln_single.emb.resolution_embedder.linear_2",
    "ar_embedder.mlp.0": "adaln_single.emb.aspect_ratio_embedder.linear_1",
    "ar_embedder.mlp.2": "adaln_single.emb.aspect_ratio_embedder.linear_2",
    "y_embedder.y_proj.fc1": "caption_projection.linear_1",
    "y_embedder.y_proj.fc2": "caption_projection.linear_2",
    "final_layer.linear": "proj_out",
}

# Names that betray a LoRA for another model family, for the refusal message.
_FOREIGN_FAMILIES = (
    (re.compile(r"down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block"), "a Stable Diffusion / SDXL UNet"),
    (re.compile(r"double_blocks|single_blocks|single_transformer_blocks"), "FLUX"),
    (re.compile(r"joint_blocks|context_block|x_block"), "Stable Diffusion 3"),
    (re.compile(r"lora_te\d?_|text_encoder|text_model"), "a text encoder"),
)


@dataclasses.dataclass
class LoraModule:
    """One LoRA update ``alpha / rank * up @ down`` of a linear layer."""

    down: torch.Tensor
    """A: (rank, in_features)."""
    up: torch.Tensor
    """B: (out_features, rank)."""
    alpha: float

    def __post_init__(self) -> None:
        if self.down.ndim != 2 or self.up.ndim != 2:
            raise UserError(
                f"only LoRA on linear layers is supported (got down {tuple(self.down.shape)}, up {tuple(self.up.shape)}); "
                "convolution LoRAs cannot be applied to PixArt-Sigma's linear layers"
            )
        if self.down.shape[0] != self.up.shape[1]:
            raise UserError(f"LoRA down {tuple(self.down.shape)} and up {tuple(self.up.shape)} have different ranks")

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """The weight update this LoRA adds at scale 1, in fp32."""
        return self.scale * (self.up.float() @ self.down.float())


@dataclasses.dataclass
class LoraWeights:
    """A LoRA in canonical form: diffusers module name -> :class:`LoraModule`."""

    modules: dict[str, LoraModule]
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    """Strings from the safetensors header (training settings, trigger words)."""
    layout: str = "peft"
    """The layout it was read from."""
    dora_magnitudes: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    """DoRA magnitude vectors per module (empty for plain LoRA)."""

    @property
    def ranks(self) -> set[int]:
        return {m.rank for m in self.modules.values()}

    def check_plain(self, what: str) -> None:
        if self.dora_magnitudes:
            raise UserError(
                f"{what} needs a plain LoRA, this adapter is DoRA (its update is not a low-rank product); "
                "fuse it into the base model with 'pixart-tune merge --fuse' instead"
            )


# --- module names --------------------------------------------------------------------


def original_name(name: str) -> tuple[str, int, int]:
    """(original checkpoint name, part index, number of parts) of a diffusers module name."""
    match = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", name)
    if match:
        block, inner = match.groups()
        for fused, parts in _FUSED.items():
            if inner in parts:
                return f"blocks.{block}.{fused}", parts.index(inner), len(parts)
        for original, diffusers in _BLOCK_NAMES.items():
            if inner == diffusers:
                return f"blocks.{block}.{original}", 0, 1
    for original, diffusers in _OUTER_NAMES.items():
        if name == diffusers:
            return original, 0, 1
    raise UserError(f"module {name} has no counterpart in the original PixArt checkpoint layout")


def diffusers_names(original: str) -> tuple[str, ...] | None:
    """Diffusers module names of an original checkpoint name (several for a fused layer)."""
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", original)
    if match:
        block, inner = match.groups()
        if inner in _FUSED:
            return tuple(f"transformer_blocks.{block}.{part}" for part in _FUSED[inner])
        if inner in _BLOCK_NAMES:
            return (f"transformer_blocks.{block}.{_BLOCK_NAMES[inner]}",)
        return None
    if original in _OUTER_NAMES:
        return (_OUTER_NAMES[original],)
    return None


def pixart_module_names(num_blocks: int = 28) -> list[str]:
    """Diffusers names of every linear layer of a PixArt-Sigma transformer."""
    inner = [part for parts in _FUSED.values() for part in parts] + list(_BLOCK_NAMES.values())
    names = [f"transformer_blocks.{i}.{name}" for i in range(num_blocks) for name in inner]
    return names + list(_OUTER_NAMES.values())


def underscored(name: str) -> str:
    return name.replace(".", "_")


# --- reading ---------------------------------------------------------------------------


def split_key(key: str) -> tuple[str, str] | None:
    """(module part, kind) of a LoRA tensor key, kind in down/up/alpha; None for other tensors."""
    for suffix, kind in _SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], kind
    return None


def detect_layout(keys: Iterable[str]) -> str:
    """The layout of a flat LoRA state dict, from its key names.

    Raises a :class:`UserError` naming what the keys look like when they are not a
    PixArt-Sigma LoRA (another model family, LoHa/LoKr tensors, no LoRA keys at all).
    """
    keys = list(keys)
    modules = [split_key(k) for k in keys]
    unknown = [k for k, m in zip(keys, modules) if m is None and not _is_dora_key(k)]
    if unknown:
        raise UserError(
            f"{len(unknown)} tensors are not LoRA weights (e.g. {unknown[0]!r}); only LoRA (lora_A/lora_B, "
            "lora_down/lora_up, alpha) is supported, not LoHa, LoKr or full-weight diffs"
        )
    names = [m[0] for m in modules if m is not None]
    if not names:
        raise UserError("the file holds no LoRA weights (no keys ending in lora_A/lora_B or lora_down/lora_up)")
    _refuse_foreign_family(names)
    for layout in ("peft-unet", "peft-model", "diffusers", "comfyui"):
        if all(n.startswith(PREFIXES[layout]) for n in names):
            return layout
    if all(n.startswith(UNDERSCORED_PREFIXES["onetrainer"]) for n in names):
        return "onetrainer"
    if all(n.startswith(UNDERSCORED_PREFIXES["kohya-original"]) for n in names):
        return "kohya-original"
    if all(n.startswith(("blocks.", *_OUTER_NAMES)) for n in names):
        return "pixart"
    if all(n.startswith(("transformer_blocks.", "adaln_single.", "caption_projection.", "proj_out", "pos_embed.")) for n in names):
        return "peft"
    prefixes = sorted({n.split(".")[0] for n in names})
    raise UserError(
        f"unrecognised LoRA key layout (key prefixes: {', '.join(prefixes[:6])}); expected PixArt-Sigma names such as "
        "'transformer.transformer_blocks.0.attn1.to_q.lora_A.weight' or 'lora_transformer_transformer_blocks_0_attn1_to_q.lora_down.weight'"
    )


def _is_dora_key(key: str) -> bool:
    return key.endswith("lora_magnitude_vector") or key.endswith("lora_magnitude_vector.weight")


def _refuse_foreign_family(names: list[str]) -> None:
    for pattern, family in _FOREIGN_FAMILIES:
        hits = [n for n in names if pattern.search(n)]
        if hits:
            raise UserError(
                f"this LoRA is for {family}, not PixArt-Sigma (keys such as {hits[0]!r}); "
                "use a LoRA trained on PixArt-Sigma"
            )


_TEXT_ENCODER_KEY = re.compile(r"^lora_te\d?_")


def _without_text_encoder(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drops the text-encoder part of a kohya / OneTrainer file that also trained T5.

    The transformer part still applies (as ComfyUI's PixArt loaders do it); a file
    with nothing but text-encoder weights is left whole, for detect_layout to refuse.
    """
    text = [key for key in state if _TEXT_ENCODER_KEY.match(key)]
    if not text or len(text) == len(state):
        return state
    logger.warning(
        "skipping %d text-encoder LoRA tensors (e.g. %s): only the transformer's LoRA is applied; "
        "the prompts are encoded by the base T5", len(text), text[0],
    )
    skipped = set(text)
    return {key: tensor for key, tensor in state.items() if key not in skipped}


def from_state_dict(
    state: dict[str, torch.Tensor],
    module_names: Iterable[str],
    default_alpha: float | None = None,
    metadata: dict[str, str] | None = None,
) -> LoraWeights:
    """Reads a flat LoRA state dict in any supported layout into canonical form.

    ``module_names`` are the diffusers names of the transformer's linear layers (to
    undo underscored names). ``default_alpha`` applies to modules without an alpha
    tensor; None means alpha = rank (scale 1), as ComfyUI assumes.
    """
    state = _without_text_encoder(state)
    layout = detect_layout(state)
    known = list(module_names)
    lookup = _name_lookup(layout, known)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    dora: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if _is_dora_key(key):
            module = key.rsplit(".lora_magnitude_vector", 1)[0]
            dora[_strip(layout, module)] = tensor
            continue
        module, kind = split_key(key)
        grouped.setdefault(module, {})[kind] = tensor
    modules: dict[str, LoraModule] = {}
    unmatched: list[str] = []
    for raw, parts in grouped.items():
        if "down" not in parts or "up" not in parts:
            raise UserError(f"LoRA module {raw} has {', '.join(sorted(parts))} but needs both down (A) and up (B) weights")
        alpha = float(parts["alpha"].float().item()) if "alpha" in parts else default_alpha
        stripped = _strip(layout, raw)
        if layout in _FUSED_LAYOUTS:
            original = lookup.get(stripped) if layout == "kohya-original" else stripped
            parts_of = diffusers_names(original) if original else None
            if parts_of is None:
                unmatched.append(raw)
                continue
            modules.update(split_fused(parts["down"], parts["up"], alpha, parts_of))
            continue
        target = lookup.get(stripped) if layout == "onetrainer" else stripped
        if target is None:
            unmatched.append(raw)
            continue
        modules[target] = LoraModule(parts["down"], parts["up"], alpha if alpha is not None else parts["down"].shape[0])
    if unmatched:
        raise UserError(
            f"{len(unmatched)} LoRA modules of the {layout} layout match no PixArt-Sigma layer (e.g. {unmatched[0]!r}); "
            "the file is for a different model"
        )
    if not modules:
        raise UserError("every LoRA weight in the file is zero, so it would change nothing (an untrained adapter?)")
    return LoraWeights(modules, dict(metadata or {}), layout, dora)


_FUSED_LAYOUTS = ("comfyui", "pixart", "kohya-original")


def _strip(layout: str, raw: str) -> str:
    prefix = PREFIXES.get(layout) or UNDERSCORED_PREFIXES.get(layout, "")
    return raw[len(prefix) :] if raw.startswith(prefix) else raw


def _name_lookup(layout: str, module_names: list[str]) -> dict[str, str]:
    """Stripped key module part -> diffusers name (or original name for fused layouts)."""
    if layout == "onetrainer":
        return {underscored(n): n for n in module_names}
    if layout == "kohya-original":
        originals = set()
        for name in module_names:
            try:
                originals.add(original_name(name)[0])
            except UserError:
                continue
        return {underscored(o): o for o in originals}
    return {}


def split_fused(down: torch.Tensor, up: torch.Tensor, alpha: float | None, names: tuple[str, ...]) -> dict[str, LoraModule]:
    """Per-part LoRAs of a LoRA on a fused layer (rows of ``up`` split evenly over ``names``).

    Part i's update is exactly ``up_i @ down``. Columns of ``up_i`` that are all zero
    (the off-diagonal blocks of a block-diagonal export) contribute nothing and are
    dropped, so a LoRA written from separate q/k/v LoRAs reads back at their ranks.
    """
    if up.shape[0] % len(names):
        raise UserError(f"fused LoRA up weight has {up.shape[0]} rows, not divisible into {len(names)} parts")
    scale = (alpha if alpha is not None else down.shape[0]) / down.shape[0]
    out = {}
    for name, up_part in zip(names, up.chunk(len(names), dim=0)):
        used = up_part.abs().sum(dim=0) != 0
        rank = int(used.sum())
        if rank == 0:
            continue
        out[name] = LoraModule(down[used].contiguous(), up_part[:, used].contiguous(), scale * rank)
    return out


# --- writing ---------------------------------------------------------------------------


def to_state_dict(weights: LoraWeights, layout: str) -> dict[str, torch.Tensor]:
    """A flat safetensors state dict of ``weights`` in ``layout``, always with alpha tensors."""
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    weights.check_plain(f"the {layout} layout")
    state: dict[str, torch.Tensor] = {}
    if layout in ("comfyui", "pixart"):
        prefix = PREFIXES.get(layout, "")
        for original, module in fuse_original(weights).items():
            key = f"{prefix}{original}"
            state[f"{key}.lora_down.weight"] = module.down
            state[f"{key}.lora_up.weight"] = module.up
            state[f"{key}.alpha"] = torch.tensor(float(module.alpha))
        return _contiguous(state)
    for name, module in weights.modules.items():
        if layout == "onetrainer":
            key = UNDERSCORED_PREFIXES["onetrainer"] + underscored(name)
            state[f"{key}.lora_down.weight"] = module.down
            state[f"{key}.lora_up.weight"] = module.up
        else:
            key = PREFIXES.get(layout, "") + name
            state[f"{key}.lora_A.weight"] = module.down
            state[f"{key}.lora_B.weight"] = module.up
        state[f"{key}.alpha"] = torch.tensor(float(module.alpha))
    return _contiguous(state)


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in state.items()}


def fuse_original(weights: LoraWeights) -> dict[str, LoraModule]:
    """LoRAs on the original checkpoint's layers, fusing q/k/v parts exactly.

    Stacking the parts' A matrices and placing their B matrices block-diagonally
    gives a LoRA of rank sum(r_i) whose update is the parts' updates stacked by rows;
    missing parts are zero rows. When the parts' scales differ they are folded into B
    so one alpha serves the fused layer.
    """
    groups: dict[str, dict[int, LoraModule]] = {}
    sizes: dict[str, int] = {}
    for name, module in weights.modules.items():
        original, index, count = original_name(name)
        groups.setdefault(original, {})[index] = module
        sizes[original] = count
    fused = {}
    for original, parts in groups.items():
        count = sizes[original]
        if count == 1:
            fused[original] = parts[0]
            continue
        out_features = next(iter(parts.values())).up.shape[0]
        scales = {m.scale for m in parts.values()}
        common = scales.pop() if len(scales) == 1 else 1.0
        ordered = [parts[i] for i in sorted(parts)]
        down = torch.cat([m.down.float() for m in ordered], dim=0)
        up = torch.zeros(out_features * count, down.shape[0])
        column = 0
        for index in sorted(parts):
            module = parts[index]
            rows = slice(index * out_features, (index + 1) * out_features)
            up[rows, column : column + module.rank] = module.up.float() * (module.scale / common)
            column += module.rank
        fused[original] = LoraModule(down, up, common * down.shape[0])
    return fused


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
        down = torch.zeros(rank, module.down.shape[1])
        up = torch.zeros(module.up.shape[0], rank)
        down[: module.rank] = module.down.float()
        up[:, : module.rank] = module.up.float() * (module.scale / target_scale)
        state[f"{name}.lora_A.weight"] = down
        state[f"{name}.lora_B.weight"] = up
    return rank, alpha, state


def from_peft_state(state: dict[str, torch.Tensor], config: dict) -> dict[str, LoraModule]:
    """Canonical modules of a PEFT state dict and its ``adapter_config.json`` contents.

    Honours ``rank_pattern`` / ``alpha_pattern`` (per-module overrides, matched as
    PEFT matches them: a regex on the end of the module name) and rslora, whose
    alpha / sqrt(r) scale is re-expressed against the canonical alpha / r.
    """
    default_rank = int(config.get("r", 8))
    default_alpha = float(config.get("lora_alpha", default_rank))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora", False))
    downs = {k[: -len(".lora_A.weight")]: v for k, v in state.items() if k.endswith(".lora_A.weight")}
    modules = {}
    for name, down in downs.items():
        up = state.get(f"{name}.lora_B.weight")
        if up is None:
            raise UserError(f"adapter has lora_A but no lora_B weight for {name}")
        rank = int(_pattern_value(rank_pattern, name, default_rank))
        alpha = float(_pattern_value(alpha_pattern, name, default_alpha))
        scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        modules[name] = LoraModule(down, up, scale * down.shape[0])
    return modules


def _pattern_value(patterns: dict, name: str, default: float) -> float:
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default
