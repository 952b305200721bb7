"""LoRA key layouts for PixArt-Sigma: detect them, and convert to and from one canonical form.

The canonical form, :class:`LoraWeights`, holds per diffusers module name
(``transformer_blocks.0.attn1.to_q``) a down matrix A (r x in), an up matrix B
(out x r) and its alpha, so the update is ``alpha / r * B @ A``. The patch
embedding ``pos_embed.proj`` is a Conv2d (kernel and stride = patch size); its
LoRA has PEFT's Conv2d shapes, A (r, in, kh, kw) and B (out, r, 1, 1), and its
update is ``B @ A`` on the flattened A, reshaped to the conv weight (as ComfyUI
and OneTrainer compute it). Every layout people produce reads into it and writes out of it:

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

Beside the transformer's LoRA a file may carry:

* a T5 text-encoder LoRA (``lora_te_encoder_block_0_layer_0_SelfAttention_q``,
  ``text_encoder.encoder.block.0...``, ``text_encoders.t5xxl.transformer.encoder.block.0...``,
  as OneTrainer writes them): read into ``LoraWeights.text_encoder`` under
  transformers' ``T5EncoderModel`` module names;
* DoRA magnitudes: PEFT's ``lora_magnitude_vector`` (one per output row) and
  OneTrainer's / ComfyUI's ``dora_scale``. A ``dora_scale`` of shape (out, 1)
  (OneTrainer's ``decompose_output_axis``) is PEFT's magnitude. OneTrainer's
  default, shape (1, in), normalises the columns of ``W + dW`` instead, which
  PEFT's DoRA cannot express: it is kept as :class:`InputDora` and becomes the
  exact weight change once the base weights are at hand
  (:func:`pixart_tune.adapters.loader.resolve_input_dora`).

and LyCORIS modules (LoKr ``lokr_*``, LoHa ``hada_*``, any naming :mod:`pixart_tune.adapters.lycoris`
reads), kept whole in ``LoraWeights.lycoris``; a file may hold only those.

Modules without an ``.alpha`` tensor take theirs from an :class:`AlphaSource`;
:mod:`pixart_tune.adapters.loader` documents the order in which it is looked for.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Iterable

import torch

from pixart_tune.adapters.lora import peft_alpha
from pixart_tune.errors import UserError

if TYPE_CHECKING:
    from pixart_tune.adapters.lycoris import LycorisModule

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
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
    ".alpha": "alpha",
    ".dora_scale": "dora_scale",
    ".lora_magnitude_vector.weight": "magnitude",
    ".lora_magnitude_vector": "magnitude",
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
    "x_embedder.proj": "pos_embed.proj",
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
    """One LoRA update ``alpha / rank * up @ down`` of a linear layer, or of a Conv2d (reshaped to its weight)."""

    down: torch.Tensor
    """A: (rank, in_features), or (rank, in_channels, kh, kw) for a Conv2d."""
    up: torch.Tensor
    """B: (out_features, rank), or (out_channels, rank, 1, 1) for a Conv2d."""
    alpha: float

    def __post_init__(self) -> None:
        conv = self.down.ndim == 4
        if self.down.ndim not in (2, 4) or self.up.ndim != self.down.ndim or (conv and tuple(self.up.shape[2:]) != (1, 1)):
            raise UserError(
                f"LoRA down {tuple(self.down.shape)} and up {tuple(self.up.shape)} are neither a linear LoRA (2-D and 2-D) "
                "nor a Conv2d LoRA (down rank x in x kh x kw, up out x rank x 1 x 1)"
            )
        if self.down.shape[0] != self.up.shape[1]:
            raise UserError(f"LoRA down {tuple(self.down.shape)} and up {tuple(self.up.shape)} have different ranks")

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the weight it changes: (out, in), or (out, in, kh, kw) for a Conv2d."""
        return (self.up.shape[0], *self.down.shape[1:])

    def delta(self) -> torch.Tensor:
        """The weight update this LoRA adds at scale 1, in fp32."""
        return self.scale * (self.up.float().flatten(1) @ self.down.float().flatten(1)).reshape(self.weight_shape)


@dataclasses.dataclass
class InputDora:
    """OneTrainer's default DoRA: ``W' = (W + dW) * m / ||W + dW||`` with one norm per input column.

    Each column's norm runs over the rows of every part together (q, k and v of a
    fused ``attn.qkv``, as OneTrainer trains it on the fused layer) and over a
    Conv2d's kernel positions; its ``norm_epsilon`` (fp32 eps) is added to it.
    """

    parts: tuple[str, ...]
    """Module names whose weights are stacked by rows (one name for an unfused layer)."""
    magnitude: torch.Tensor
    """m: one value per input feature (input channel of a Conv2d)."""


ALPHA_STORED = "stored with the weights"
NO_ALPHA = "nowhere (alpha = rank, scale 1: a guess)"


@dataclasses.dataclass
class AlphaSource:
    """The alpha of modules that carry no ``.alpha`` tensor, and where it was found."""

    where: str = NO_ALPHA
    alpha: float | None = None
    """One alpha for every module; None means alpha = rank (scale 1)."""
    configs: dict[str, dict] = dataclasses.field(default_factory=dict)
    """PEFT LoraConfig fields (r, lora_alpha, rank_pattern, alpha_pattern, use_rslora) per component
    (``transformer``, ``text_encoder``; ``""`` for every component)."""

    def alpha_of(self, component: str, name: str, rank: int) -> float:
        config = self.configs.get(component, self.configs.get(""))
        if config is not None:
            return peft_alpha(config, name, rank)
        return float(self.alpha) if self.alpha is not None else float(rank)


@dataclasses.dataclass
class LoraWeights:
    """A LoRA in canonical form: diffusers module name -> :class:`LoraModule`."""

    modules: dict[str, LoraModule]
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    """Strings from the safetensors header (training settings, trigger words)."""
    layout: str = "peft"
    """The layout it was read from."""
    dora_magnitudes: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    """PEFT DoRA magnitude per module, one value per output row (empty for plain LoRA)."""
    dora_inputs: list[InputDora] = dataclasses.field(default_factory=list)
    """OneTrainer's per-input-column DoRA groups, applied by :func:`pixart_tune.adapters.loader.resolve_input_dora`."""
    text_encoder: LoraWeights | None = None
    """The T5 part of a file that also trained the text encoder (T5EncoderModel module names)."""
    alpha_source: str = ALPHA_STORED
    """Where the alpha came from (a file's ``.alpha`` tensors, its header, a JSON beside it, or nowhere)."""
    lycoris: dict[str, LycorisModule] = dataclasses.field(default_factory=dict)
    """LoKr / LoHa modules by diffusers module name (:mod:`pixart_tune.adapters.lycoris`), each with its own scale."""

    @property
    def ranks(self) -> set[int]:
        return {m.rank for m in self.modules.values()}

    def check_lora_only(self, what: str, advice: str) -> None:
        """Refuses an adapter with LoKr / LoHa modules where only plain LoRA can go, in one line with ``advice``."""
        if self.lycoris:
            kinds = "/".join(sorted({type(m).__name__[:4].replace("Lokr", "LoKr").replace("Loha", "LoHa") for m in self.lycoris.values()}))
            raise UserError(f"{what} holds plain LoRA only and this adapter has {len(self.lycoris)} {kinds} modules; {advice}")

    @property
    def alpha_guessed(self) -> bool:
        """No alpha was stored for some modules: they apply at alpha = rank, the strength ComfyUI assumes."""
        return NO_ALPHA in self.alpha_source

    def check_plain(self, what: str) -> None:
        if self.dora_magnitudes or self.dora_inputs:
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
    """(module part, kind) of a LoRA tensor key, kind in down/up/alpha/dora_scale/magnitude; None for other tensors."""
    for suffix, kind in _SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], kind
    return None


def detect_layout(keys: Iterable[str]) -> str:
    """The layout of a flat LoRA state dict, from its key names.

    Raises a :class:`UserError` naming what the keys look like when they are not a
    PixArt-Sigma LoRA (another model family, full-weight diffs, no LoRA keys at all).
    LoKr / LoHa keys are not LoRA layouts: :func:`from_state_dict` splits them off first.
    """
    keys = list(keys)
    modules = [split_key(k) for k in keys]
    unknown = [k for k, m in zip(keys, modules) if m is None]
    if unknown:
        raise UserError(
            f"{len(unknown)} tensors are not LoRA weights (e.g. {unknown[0]!r}); LoRA (lora_A/lora_B, "
            "lora_down/lora_up, alpha, DoRA magnitudes) is read here, LoHa and LoKr by from_state_dict, not full-weight diffs"
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


def _refuse_foreign_family(names: list[str]) -> None:
    for pattern, family in _FOREIGN_FAMILIES:
        hits = [n for n in names if pattern.search(n)]
        if hits:
            raise UserError(
                f"this LoRA is for {family}, not PixArt-Sigma (keys such as {hits[0]!r}); "
                "use a LoRA trained on PixArt-Sigma"
            )


# A T5 text-encoder LoRA beside the transformer's, by writer: kohya and OneTrainer LEGACY / KOHYA (underscored
# names), diffusers and OneTrainer DIFFUSERS, ComfyUI and OneTrainer COMFY.
TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "text_encoder.", "text_encoders.t5xxl.transformer.")
_T5_MODULE = re.compile(r"encoder[._]block[._](\d+)[._]layer[._](\d+)[._](SelfAttention|DenseReluDense)[._](q|k|v|o|wi_0|wi_1|wi|wo)")


def split_text_encoder(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(transformer part, T5 part) of a flat state dict; T5 keys become ``encoder.block.0.layer.0.SelfAttention.q...``."""
    transformer, text, foreign = {}, {}, []
    for key, tensor in state.items():
        prefix = next((p for p in TEXT_ENCODER_PREFIXES if key.startswith(p)), None)
        parsed = split_key(key[len(prefix) :]) if prefix else None
        if prefix is None:
            transformer[key] = tensor
        elif parsed and (match := _T5_MODULE.fullmatch(parsed[0])):
            block, layer, kind, name = match.groups()
            text[f"encoder.block.{block}.layer.{layer}.{kind}.{name}{key[len(prefix) + len(parsed[0]) :]}"] = tensor
        else:
            foreign.append(key)
    if foreign:
        raise UserError(
            f"{len(foreign)} text-encoder LoRA tensors are not for T5, PixArt-Sigma's text encoder (e.g. {foreign[0]!r}); "
            "this LoRA is for a text encoder of another model"
        )
    if text and not transformer:
        raise UserError(
            "the file holds only a text-encoder (T5) LoRA and nothing for the transformer; pixart-tune applies "
            "a T5 LoRA only as the text-encoder part of a PixArt-Sigma LoRA"
        )
    return transformer, text


def from_state_dict(
    state: dict[str, torch.Tensor],
    module_names: Iterable[str],
    alphas: AlphaSource | None = None,
    metadata: dict[str, str] | None = None,
) -> LoraWeights:
    """Reads a flat LoRA state dict in any supported layout into canonical form.

    ``module_names`` are the diffusers names of the transformer's layers (to undo
    underscored names). Modules without an ``.alpha`` tensor take the alpha of
    ``alphas`` (by default none: alpha = rank, scale 1, as ComfyUI assumes). A T5
    part goes to ``text_encoder``.
    """
    from pixart_tune.adapters.lycoris import lycoris_keys, read_lycoris

    alphas = alphas or AlphaSource()
    module_names = list(module_names)
    if lycoris := lycoris_keys(state):  # LoKr / LoHa modules, and the plain LoRA beside them if any
        rest = {k: v for k, v in state.items() if k not in lycoris}
        weights = from_state_dict(rest, module_names, alphas, metadata) if rest else LoraWeights({}, dict(metadata or {}), "lycoris")
        weights.lycoris = read_lycoris({k: state[k] for k in lycoris}, module_names)
        return weights
    transformer_state, text_state = split_text_encoder(state)
    layout = detect_layout(transformer_state)
    lookup = _name_lookup(layout, list(module_names))
    reader, unmatched = _Reader(alphas, "transformer"), []
    for raw, parts in _grouped(transformer_state).items():
        stripped = _strip(layout, raw)
        if layout in _FUSED_LAYOUTS:
            original = lookup.get(stripped) if layout == "kohya-original" else stripped
            names = diffusers_names(original) if original else None
        else:
            target = lookup.get(stripped) if layout == "onetrainer" else stripped
            names = (target,) if target else None
        if names is None:
            unmatched.append(raw)
            continue
        reader.add(raw, parts, names)
    if unmatched:
        raise UserError(
            f"{len(unmatched)} LoRA modules of the {layout} layout match no PixArt-Sigma layer (e.g. {unmatched[0]!r}); "
            "the file is for a different model"
        )
    if not reader.modules:
        raise UserError("every LoRA weight in the file is zero, so it would change nothing (an untrained adapter?)")
    weights = reader.weights(layout, metadata)
    if text_state:
        text = _Reader(alphas, "text_encoder")
        for raw, parts in _grouped(text_state).items():
            text.add(raw, parts, (raw,))
        weights.text_encoder = text.weights(layout, {})
    return weights


def _grouped(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, kind = split_key(key)
        grouped.setdefault(module, {})[kind] = tensor
    return grouped


class _Reader:
    """Collects canonical modules, DoRA magnitudes and where their alphas came from."""

    def __init__(self, alphas: AlphaSource, component: str):
        self.alphas, self.component = alphas, component
        self.modules: dict[str, LoraModule] = {}
        self.magnitudes: dict[str, torch.Tensor] = {}
        self.inputs: list[InputDora] = []
        self.stored = self.looked_up = 0

    def add(self, raw: str, parts: dict[str, torch.Tensor], names: tuple[str, ...]) -> None:
        if "down" not in parts or "up" not in parts:
            raise UserError(f"LoRA module {raw} has {', '.join(sorted(parts))} but needs both down (A) and up (B) weights")
        down, up = parts["down"], parts["up"]
        if "alpha" in parts:
            alpha, self.stored = float(parts["alpha"].float().item()), self.stored + 1
        else:
            alpha, self.looked_up = self.alphas.alpha_of(self.component, names[0] if len(names) == 1 else raw, down.shape[0]), self.looked_up + 1
        dora, magnitude = parts.get("dora_scale"), parts.get("magnitude")
        try:
            if len(names) == 1:
                self.modules[names[0]] = LoraModule(down, up, alpha)
            else:
                self.modules.update(split_fused(down, up, alpha, names, keep_all=dora is not None or magnitude is not None))
        except UserError as error:
            raise UserError(f"LoRA module {raw}: {error}") from error
        if magnitude is not None or (dora is not None and dora.shape[0] == up.shape[0]):
            # PEFT's magnitude, or OneTrainer's decompose_output_axis: one value per output row (ComfyUI's test).
            self.magnitudes.update(zip(names, (magnitude if magnitude is not None else dora).float().flatten().chunk(len(names))))
        elif dora is not None:
            if dora.numel() != down.shape[1]:
                raise UserError(f"LoRA module {raw}: dora_scale {tuple(dora.shape)} fits neither its {up.shape[0]} outputs nor its {down.shape[1]} inputs")
            self.inputs.append(InputDora(names, dora.float().flatten()))

    def weights(self, layout: str, metadata: dict[str, str] | None) -> LoraWeights:
        if not self.looked_up:
            where = "alpha tensors in the file"
        elif not self.stored:
            where = self.alphas.where
        else:
            where = f"alpha tensors in the file; {self.alphas.where} for {self.looked_up} modules without one"
        return LoraWeights(self.modules, dict(metadata or {}), layout, self.magnitudes, self.inputs, alpha_source=where)


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


def split_fused(down: torch.Tensor, up: torch.Tensor, alpha: float | None, names: tuple[str, ...], keep_all: bool = False) -> dict[str, LoraModule]:
    """Per-part LoRAs of a LoRA on a fused layer (rows of ``up`` split evenly over ``names``).

    Part i's update is exactly ``up_i @ down``. Columns of ``up_i`` that are all zero
    (the off-diagonal blocks of a block-diagonal export) contribute nothing and are
    dropped, so a LoRA written from separate q/k/v LoRAs reads back at their ranks;
    ``keep_all`` keeps every part whole (DoRA rescales even a part the LoRA leaves alone).
    """
    if up.shape[0] % len(names):
        raise UserError(f"fused LoRA up weight has {up.shape[0]} rows, not divisible into {len(names)} parts")
    scale = (alpha if alpha is not None else down.shape[0]) / down.shape[0]
    out = {}
    for name, up_part in zip(names, up.chunk(len(names), dim=0)):
        used = torch.ones(up_part.shape[1], dtype=torch.bool) if keep_all else up_part.abs().sum(dim=0) != 0
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
