"""``pixart-tune plan``: the peak GPU memory a recipe will need, predicted without a GPU.

The method (docs/training.md explains it in full):

* **Weights, LoRA, gradients, optimizer state** are counted exactly: the real
  architecture is instantiated on PyTorch's ``meta`` device (shapes, no memory),
  the recipe's LoRA is injected into it with the same code the trainer uses, and
  parameters are counted at their training dtypes (base in the recipe's dtype,
  LoRA weights and gradients fp32, optimizer bytes per weight from
  ``optim.STATE_BYTES_PER_PARAM``).
* **Activations** are measured, not guessed: one forward of that meta model at the
  recipe's largest bucket (over all its datasets, see :func:`resolution_of`) and
  batch runs under ``saved_tensors_hooks``, which sees every tensor autograd keeps
  for backward (deduplicated by storage, parameters excluded). Attention is traced
  as the fused kernels CUDA runs (flash / memory-efficient SDPA keep q, k, v, the
  output and the log-sum-exp, never the N x N matrix). With gradient checkpointing
  each checkpointed block keeps only its input (every block, or every k-th), plus
  one block's activations while it is recomputed. With ``lora_compute_dtype: base``
  the traced LoRA layers run as training runs them, so the trace has no fp32 copies.
* **Backward working set** (gradients in flight inside one block) is estimated as
  one block's activations, and a fixed CUDA context + allocator reserve is added.
* **EMA** (``ema.enabled``): the shadow is an fp32 copy of every trainable LoRA
  weight (``training.ema.LoraEma``), 4 bytes each, resident all run.
* **Loss masks**: a batch with a masked image carries fp32 [1, h/8, w/8] weights per
  sample (``training.dataset.collate``), counted when a prepared dataset's
  ``dataset.json`` lists items with a ``mask_key``; a dataset not prepared yet
  counts none.
* **Phases with their own peak**: start-up (T5 alone, for the validation prompts)
  and, with ``validation.clip_model``, CLIP scoring: validation moves the VAE back
  to the CPU and CLIP onto the device after drawing (``training.validation``), beside
  the weights, optimizer state and EMA (plus the copy of the raw LoRA weights
  ``LoraEma.applied`` holds while the average is validated); gradients are freed
  by then (``zero_grad(set_to_none=True)``). CLIP's parameters are counted from its
  config.json on the meta device, in bf16 (``base.auto_dtype`` on CUDA); its forward
  on a few images is not counted. Drawing the validation images (VAE decode,
  sampling at the validation size) is not planned.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pixart_tune.adapters.lora import inject_lora, trainable_parameters
from pixart_tune.base import MANIFEST, MAX_TOKENS, auto_dtype, resolve_dtype
from pixart_tune.errors import UserError
from pixart_tune.fsutil import os_error_text, read_regular
from pixart_tune.models import T5_XXL_CONFIG, XL2_TRANSFORMER_CONFIG, meta_transformer
from pixart_tune.training.config import TrainConfig, check_lora_targets
from pixart_tune.training.lora_dtype import set_lora_compute_dtype
from pixart_tune.training.optim import STATE_BYTES_PER_PARAM
from pixart_tune.training.speed import checkpointed_blocks

GIB = 2**30
# CUDA context, cuBLAS/cuDNN workspaces and allocator fragmentation: what
# nvidia-smi shows beyond torch's allocated bytes on a training process.
CONTEXT_RESERVE_GIB = 1.0
FRAGMENTATION = 0.10
"""Share of the dynamic memory (activations + working set) lost to fragmentation."""
FP32_BYTES = torch.finfo(torch.float32).bits // 8
CLIP_BYTES = torch.finfo(auto_dtype("cuda")).bits // 8
"""ClipScorer's default dtype on a CUDA device (bf16: 2 bytes a parameter)."""
EMA_ROW = "EMA shadow of the LoRA weights (fp32)"
MASK_ROW = "loss masks (fp32, latent resolution)"


@dataclasses.dataclass
class MemoryPlan:
    description: list[str]
    """Lines saying what was planned (model, bucket, batch, options)."""
    rows: list[tuple[str, float]]
    """(component, bytes) in table order: the training peak."""
    budget_gib: float
    startup: tuple[str, float] | None = None
    """(what, bytes) of a start-up phase with its own peak: T5 encoding the
    validation prompts, alone on the device before the transformer loads."""
    validation: tuple[str, float] | None = None
    """(what, bytes) of validation's CLIP scoring, a peak of its own (``validation.clip_model``)."""
    notes: list[str] = dataclasses.field(default_factory=list)
    """What the plan could not count, one line each."""

    @property
    def total_bytes(self) -> float:
        return sum(size for _, size in self.rows)

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    @property
    def peak_gib(self) -> float:
        """The highest of the training peak and the start-up and validation peaks."""
        phases = [phase[1] for phase in (self.startup, self.validation) if phase]
        return max([self.total_bytes, *phases]) / GIB

    @property
    def fits(self) -> bool:
        return self.peak_gib <= self.budget_gib

    def table(self) -> str:
        width = max(len(name) for name, _ in self.rows)
        lines = list(self.description) + ["", f"{'component':<{width}}  {'GiB':>7}"]
        lines += [f"{name:<{width}}  {size / GIB:7.2f}" for name, size in self.rows]
        lines += [f"{'-' * width}  {'-' * 7}", f"{'predicted peak':<{width}}  {self.total_gib:7.2f}"]
        if self.startup:
            lines.append(f"start-up, before training: {self.startup[0]}: {self.startup[1] / GIB:.2f} GiB")
        if self.validation:
            lines.append(f"validation, CLIP scoring: {self.validation[0]}: {self.validation[1] / GIB:.2f} GiB")
        lines += [f"note: {note}" for note in self.notes]
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(f"budget {self.budget_gib:g} GiB: {verdict} (margin {self.budget_gib - self.peak_gib:+.2f} GiB)")
        return "\n".join(lines)


def architecture(model: str) -> dict[str, Any]:
    """The transformer config of a local model folder, else (a hub id) the real XL-2 config.

    A folder that is not a model, or a path that does not exist, is refused: planning
    it as XL-2 would answer a question nobody asked.
    """
    folder = Path(model).expanduser()
    config_file = folder / "transformer" / "config.json"
    if not folder.exists() and not _local_path(model):
        return dict(XL2_TRANSFORMER_CONFIG)
    if not config_file.is_file():
        what = "does not exist" if not folder.exists() else "is not a PixArt-Sigma model folder (no transformer/config.json)"
        raise UserError(f"model {model} {what}; set model= to a diffusers-layout model folder or a hub id")
    try:
        data = json.loads(read_regular(config_file).decode("utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        arch = {k: v for k, v in data.items() if not k.startswith("_")}
        for key in ("num_layers", "num_attention_heads", "attention_head_dim", "in_channels", "caption_channels"):
            if not isinstance(arch.get(key), int) or isinstance(arch[key], bool) or arch[key] < 1:
                raise ValueError(f"{key} is {arch.get(key)!r}, not a positive integer")
    except OSError as error:
        raise UserError(f"cannot read {config_file} ({os_error_text(error)})") from None
    except ValueError as error:
        raise UserError(f"{config_file} is damaged ({error}); restore the model folder (or run init-tiny / download it again)") from None
    return arch


def _local_path(model: str) -> bool:
    """Whether ``model`` is written as a path (a hub id is ``owner/name``, nothing more)."""
    return model.startswith((".", "/", "~")) or model.endswith("/") or model.count("/") != 1


def largest_bucket(resolution: int) -> tuple[int, int]:
    """(height, width) of the bucket with the most pixels in the diffusers table."""
    from pixart_tune.data.buckets import bucket_sizes

    return max(bucket_sizes(resolution), key=lambda hw: (hw[0] * hw[1], hw))


def plan_memory(
    config: TrainConfig,
    resolution: int,
    budget_gib: float | None = None,
    transformer_config: dict[str, Any] | None = None,
) -> MemoryPlan:
    """Predicted peak GPU memory of training ``config`` at the largest bucket of ``resolution``.

    ``gradient_checkpointing: auto`` is planned as what it resolves to (the least
    recomputation that fits the budget), as ``train`` will run it.
    """
    if config.gradient_checkpointing == "auto":
        from pixart_tune.training.autoplan import resolve_auto

        config = resolve_auto(config, resolution)[0]
    arch = transformer_config or architecture(config.model)
    dtype = resolve_dtype(config.dtype)
    base_bytes = torch.finfo(dtype).bits // 8
    layers = arch["num_layers"]
    # The blocks are identical: a two-block model on the meta device is traced, and
    # the counts of its second block (the first keeps less: its input needs no
    # gradient) are multiplied up to the real depth.
    transformer = meta_transformer(dict(arch, num_layers=2), dtype)
    block_params = sum(p.numel() for p in transformer.transformer_blocks[1].parameters())
    base_params = sum(p.numel() for p in transformer.parameters()) + (layers - 2) * block_params
    check_lora_targets(config.lora, (name for name, _ in transformer.named_modules()), config.model)
    # PEFT builds the LoRA layers on the default device before moving them to the
    # base layer's: under torch.device("meta") even rank 1000000 allocates nothing.
    with torch.device("meta"):
        inject_lora(transformer, config.lora)
    if config.lora_compute_dtype == "base":
        # The trace then sees what that mode keeps: base-dtype LoRA inputs, no fp32 copies.
        set_lora_compute_dtype(transformer, dtype)
    block_lora = sum(p.numel() for p in trainable_parameters(transformer.transformer_blocks[1]))
    lora_params = sum(p.numel() for p in trainable_parameters(transformer)) + (layers - 2) * block_lora

    height, width = largest_bucket(resolution)
    batch = config.data.batch_size
    trace = trace_activations(transformer, batch, height, width, dtype, caption_channels=arch["caption_channels"])
    block = trace.blocks[1]
    # A checkpointed block keeps only its input (one block is recomputed at a time,
    # in backward); the others keep all their activations. Block 0 is checkpointed
    # in every mode that checkpoints any (blocks 0, k, 2k, ...).
    recomputed = len(checkpointed_blocks(config.gradient_checkpointing, layers))
    if recomputed:
        activations = trace.outside + recomputed * trace.block_input + (layers - recomputed) * block + block
    else:
        activations = trace.outside + trace.blocks[0] + (layers - 1) * block
    working = block
    optimizer_bytes = STATE_BYTES_PER_PARAM[config.optim.name] * lora_params
    # LoraEma.shadow: p.detach().float().clone() of every trainable (fp32) LoRA weight.
    ema_bytes = lora_params * FP32_BYTES if config.ema.enabled else 0
    tokens = (height // 16) * (width // 16)
    inputs = batch * (2 * 4 * arch["in_channels"] * (height // 8) * (width // 8) + MAX_TOKENS * (arch["caption_channels"] * base_bytes + 8))
    # collate: one fp32 [1, h/8, w/8] mask per sample once any image of the batch has one.
    masks = batch * (height // 8) * (width // 8) * FP32_BYTES if masked_images(config) else 0
    rows = [
        (f"base weights ({config.dtype})", float(base_params * base_bytes)),
        ("LoRA weights (fp32)", float(lora_params * FP32_BYTES)),
        ("LoRA gradients (fp32)", float(lora_params * FP32_BYTES)),
        (f"optimizer state ({config.optim.name})", float(optimizer_bytes)),
        *([(EMA_ROW, float(ema_bytes))] if ema_bytes else []),
        ("batch inputs (latents, noise, T5 embeddings)", float(inputs)),
        *([(MASK_ROW, float(masks))] if masks else []),
        (f"activations kept for backward{f' ({recomputed} of {layers} blocks checkpointed)' if recomputed else ''}", float(activations)),
        ("backward working set (one block)", float(working)),
        ("allocator fragmentation (10% of dynamic)", FRAGMENTATION * (activations + working)),
        ("CUDA context + workspaces", CONTEXT_RESERVE_GIB * GIB),
    ]
    description = [
        f"model: {arch['num_layers']} layers x width {arch['num_attention_heads'] * arch['attention_head_dim']} "
        f"({base_params / 1e6:.1f} M parameters) in {config.dtype}",
        f"LoRA: rank {config.lora.rank} on {config.lora.targets} ({lora_params / 1e6:.2f} M trainable), optimizer {config.optim.name}",
        f"largest {resolution} px bucket {height}x{width} ({tokens} image tokens), batch {batch}, "
        f"gradient checkpointing {_checkpointing_words(recomputed, layers)}, LoRA computed in "
        f"{config.dtype if config.lora_compute_dtype == 'base' else 'fp32'}",
    ]
    startup = None
    if config.validation.prompts:
        # validation.encode_prompts: T5 in bf16, alone, before the transformer loads.
        startup = ("T5 in bf16 for the validation prompts, alone", text_encoder_params(config.model) * 2 + CONTEXT_RESERVE_GIB * GIB)
    validation, notes = None, []
    if config.validation.prompts and config.validation.clip_model:
        clip = clip_params(config.validation.clip_model)
        if clip is None:
            notes.append(f"validation.clip_model {config.validation.clip_model} is neither a local folder nor in the Hugging Face "
                         "cache: the CLIP model's size is not counted")
        else:
            # Resident through validation: weights, optimizer state, the EMA shadow and,
            # while LoraEma.applied swaps the average in, a copy of the raw LoRA weights.
            resident = base_params * base_bytes + lora_params * FP32_BYTES + optimizer_bytes + 2 * ema_bytes
            beside = "the weights, optimizer state" + (" and EMA (shadow + raw copy)" if ema_bytes else "")
            validation = (f"CLIP ({clip / 1e6:.1f} M parameters) in bf16 beside {beside}", float(resident + clip * CLIP_BYTES + CONTEXT_RESERVE_GIB * GIB))
    budget = budget_gib if budget_gib is not None else config.memory_budget_gb
    return MemoryPlan(description, rows, budget, startup, validation, notes)


def _checkpointing_words(recomputed: int, layers: int) -> str:
    if not recomputed:
        return "off"
    return "on" if recomputed == layers else f"on {recomputed} of {layers} blocks"


def text_encoder_params(model: str) -> int:
    """Parameters of the model folder's T5 encoder (T5-XXL's for a hub id), counted on the meta device."""
    from transformers import T5Config, T5EncoderModel

    config_file = Path(model) / "text_encoder" / "config.json"
    config = T5Config.from_json_file(config_file) if config_file.is_file() else T5Config(**T5_XXL_CONFIG)
    with torch.device("meta"):
        encoder = T5EncoderModel(config)
    return sum(p.numel() for p in encoder.parameters())


def masked_images(config: TrainConfig) -> int:
    """Items with a loss mask over the recipe's prepared training datasets (0 for any not prepared yet).

    Read from each ``dataset.json``'s raw items (``"mask_key"``, set by prepare for
    an image with a mask), so the count needs nothing but the manifest's JSON.
    """
    count = 0
    for folder, _ in config.data.sources():
        manifest = Path(folder) / MANIFEST
        if not manifest.is_file():
            continue
        try:
            items = json.loads(read_regular(manifest).decode("utf-8")).get("items", [])
            count += sum(bool(isinstance(item, dict) and item.get("mask_key")) for item in items)
        except OSError as error:
            raise UserError(f"cannot read {manifest} ({os_error_text(error)})") from None
        except (ValueError, AttributeError) as error:
            raise UserError(f"{manifest} is damaged ({error}); re-run pixart-tune prepare") from None
    return count


@functools.lru_cache(maxsize=8)  # autoplan plans a recipe once per batch size and checkpointing mode
def clip_params(model: str) -> int | None:
    """Parameters of CLIP model ``model`` counted on the meta device from its config.json, or None
    when that is not at hand (neither a local folder nor a hub id in the local cache; no network asked)."""
    from transformers import CLIPConfig, CLIPModel

    folder = Path(model).expanduser()
    config_file: Path | str | None = folder / "config.json" if folder.is_dir() else None
    if config_file is None:
        from huggingface_hub import try_to_load_from_cache

        try:
            config_file = try_to_load_from_cache(model, "config.json")
        except ValueError:  # not a hub id either; the trainer says so when validation is set up
            return None
    if not isinstance(config_file, (str, Path)) or not Path(config_file).is_file():
        return None
    try:
        config = CLIPConfig.from_json_file(str(config_file))
    except (OSError, ValueError) as error:
        raise UserError(f"validation.clip_model {model}: cannot read {config_file} ({error})") from None
    with torch.device("meta"):
        clip = CLIPModel(config)
    return sum(p.numel() for p in clip.parameters())


@dataclasses.dataclass
class ActivationTrace:
    outside: int
    """Bytes saved outside the transformer blocks (embeddings, caption projection, head)."""
    blocks: list[int]
    """Bytes saved inside each block."""
    block_input: int
    """Bytes of one block's input hidden states (what checkpointing keeps)."""


def trace_activations(
    transformer: torch.nn.Module, batch: int, height: int, width: int, dtype: torch.dtype, caption_channels: int
) -> ActivationTrace:
    """Runs one meta-device training forward and sums what autograd saves for backward."""
    device = torch.device("meta")
    latents = torch.empty(batch, transformer.config.in_channels, height // 8, width // 8, device=device, dtype=dtype)
    embeds = torch.empty(batch, MAX_TOKENS, caption_channels, device=device, dtype=dtype)
    mask = torch.ones(batch, MAX_TOKENS, device=device, dtype=torch.long)
    timesteps = torch.zeros(batch, device=device, dtype=torch.long)
    params = {p.untyped_storage()._cdata for p in transformer.parameters()}
    seen: set[int] = set()
    kept: list[torch.Tensor] = []  # keeps storages alive so their ids stay unique
    totals = {"outside": 0}
    current = ["outside"]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in params and key not in seen:
            seen.add(key)
            kept.append(tensor)
            totals[current[0]] = totals.get(current[0], 0) + storage.nbytes()
        return tensor

    hooks = []
    for index, block in enumerate(transformer.transformer_blocks):
        hooks.append(block.register_forward_pre_hook(lambda m, a, i=index: current.__setitem__(0, i)))
        hooks.append(block.register_forward_hook(lambda m, a, o: current.__setitem__(0, "outside")))
    try:
        with _fused_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            transformer(
                latents,
                encoder_hidden_states=embeds,
                encoder_attention_mask=mask,
                timestep=timesteps,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                return_dict=False,
            )
    finally:
        for hook in hooks:
            hook.remove()
    tokens = (height // 8 // transformer.config.patch_size) * (width // 8 // transformer.config.patch_size)
    inner = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    blocks = [totals.get(i, 0) for i in range(len(transformer.transformer_blocks))]
    return ActivationTrace(totals["outside"], blocks, batch * tokens * inner * (torch.finfo(dtype).bits // 8))


class _FusedSDPA(torch.autograd.Function):
    """What flash / memory-efficient attention keeps for backward: q, k, v, out, lse."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = query.new_empty(*query.shape[:-1], value.shape[-1])
        lse = torch.empty(query.shape[:-1], dtype=torch.float32, device=query.device)
        ctx.save_for_backward(query, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the trace is forward-only
        query, key, value, _, _ = ctx.saved_tensors
        return torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)


@contextlib.contextmanager
def _fused_attention():
    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return _FusedSDPA.apply(query, key, value)

    # The meta device only has the math path, which would keep the N x N scores.
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def resolution_of(config: TrainConfig) -> int:
    """The bucket table with the largest buckets over all of the recipe's datasets.

    The main dataset is at ``resolution`` (or, unset, what its manifest says); an
    extra dataset counts at its manifest's resolution once prepared, and at the
    main one's before (``plan`` usually runs before ``prepare``).
    """
    main = config.resolution if config.resolution is not None else _prepared_resolution(config.data.path)
    if main is None:
        raise UserError("the recipe sets no resolution and names no prepared dataset: pass resolution=1024 (or 256, 512, 2048)")
    extras = [_prepared_resolution(extra.path) for extra in config.data.extra]
    return max([main, *(resolution for resolution in extras if resolution is not None)])


def _prepared_resolution(path: Path | None) -> int | None:
    if path is None or not (Path(path) / MANIFEST).is_file():
        return None
    from pixart_tune.data.cache import FeatureCache

    return FeatureCache(path).read_manifest().resolution
