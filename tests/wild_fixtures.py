"""LoRA files as the trainers people use write them for PixArt-Sigma, and the weight change each one means.

One writer per trainer file. Each reproduces, from the trainer's source, its key
names, alpha convention, dtype and file placement, fills the adapter with seeded
random "trained" values, and returns the file together with the effective weight
change of every layer computed with that trainer's own math (never through
pixart-tune's loader). Where the trainer's save code is diffusers' or PEFT's, the
real function runs here; where it lives in the trainer's repository, it is
reproduced step by step with the source cited.

Sources read (repository @ commit, path):

* Nerogar/OneTrainer @ 23df3832e8f213d64c337e39f9365ba46e99fed0:
  modules/module/LoRAModule.py (PeftBase.make_weight, LoRAModule, DoRAModule,
  LoRAModuleWrapper), modules/module/FusedModule.py, modules/util/ModuleFilter.py,
  modules/modelSaver/mixin/LoRASaverMixin.py, modules/modelSaver/pixartAlpha/PixArtAlphaLoRASaver.py,
  modules/modelSaver/mixin/DtypeModelSaverMixin.py (header), modules/util/convert_lora_util.py,
  modules/util/convert_util.py (lora_fold_alpha, dora_scale_to_peft_magnitude),
  modules/model/PixArtAlphaModel.py (fusion_groups, diffusers_to_original, lora_text_encoders),
  modules/util/config/TrainConfig.py (defaults: rank 16, alpha 1.0, layer_filter_preset "full",
  lora_decompose_output_axis False, lora_decompose_norm_epsilon True, output_dtype FLOAT_32).
* bghira/SimpleTuner @ bc8e6ab7738ce457a2ed8eb2d26cadd91c6442cb:
  simpletuner/helpers/training/save_hooks.py (_save_lora, _append_metadata_to_safetensors,
  _build_modelspec_metadata), simpletuner/helpers/models/pixart/pipeline.py
  (PixArtSigmaControlNetLoraLoaderMixin.save_lora_weights), simpletuner/helpers/models/pixart/model.py
  (DEFAULT_LORA_TARGET), simpletuner/helpers/models/common.py (add_lora_adapter).
* PixArt-alpha/PixArt-sigma @ 1ce521afddcc2fab329b35b7374aa86d654e12f7: train_scripts/train_pixart_lora_hf.py.
* huggingface/diffusers @ 58eb52c0803ea9af3abec60841c2a093bdf1f951: src/diffusers/loaders/lora_base.py
  (_pack_dict_with_prefix, write_lora_layers, LORA_ADAPTER_METADATA_KEY), src/diffusers/training_utils.py
  (_collate_lora_metadata), examples/dreambooth/train_dreambooth_lora_sana.py (save_model_hook).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from pixart_tune.models import load_transformer


@dataclasses.dataclass
class WildFile:
    """A trainer's LoRA file and what it means."""

    path: Path
    transformer: dict[str, torch.Tensor]
    """Effective weight change per diffusers module name (at strength 1)."""
    text_encoder: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    """Effective weight change per T5EncoderModel module name."""


def load_text_encoder(model: str):
    from transformers import T5EncoderModel

    return T5EncoderModel.from_pretrained(Path(model) / "text_encoder")


def _fill(model: nn.Module, seed: int, std: float = 0.3) -> None:
    """Seeded random values in every LoRA parameter (PEFT initialises B, or A, to zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


# --- OneTrainer -----------------------------------------------------------------------------------------

OT_REVISION = "23df3832e8f213d64c337e39f9365ba46e99fed0"

# PixArtAlphaModel.fusion_groups(): self-attention q/k/v fuse to attn1.qkv, cross-attention k/v to attn2.kv,
# built fused only for the ORIGINAL, COMFY and KOHYA formats (ModelFormat.needs_qkv_fusion).
_OT_FUSION = (("attn1", ("to_q", "to_k", "to_v"), "attn1.qkv"), ("attn2", ("to_k", "to_v"), "attn2.kv"))

# PixArtAlphaModel.diffusers_to_original(), the LoRA body of the ORIGINAL and COMFY formats.
_OT_ORIGINAL_OUTER = {
    "adaln_single.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "adaln_single.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "adaln_single.linear": "t_block.1",
    "caption_projection.linear_1": "y_embedder.y_proj.fc1",
    "caption_projection.linear_2": "y_embedder.y_proj.fc2",
    "pos_embed.proj": "x_embedder.proj",
    "proj_out": "final_layer.linear",
}
_OT_ORIGINAL_BLOCK = {
    "attn1.qkv": "attn.qkv",
    "attn2.kv": "cross_attn.kv_linear",
    "attn1.to_out.0": "attn.proj",
    "attn2.to_q": "cross_attn.q_linear",
    "attn2.to_out.0": "cross_attn.proj",
    "ff.net.0.proj": "mlp.fc1",
    "ff.net.2": "mlp.fc2",
}


@dataclasses.dataclass
class _OTModule:
    """One OneTrainer LoRAModule / DoRAModule: canonical name under its wrapper prefix, and its base leaves."""

    name: str
    leaves: list[tuple[str, torch.Tensor]]
    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    dora_scale: torch.Tensor | None = None

    def deltas(self) -> dict[str, torch.Tensor]:
        """W' - W per leaf, by OneTrainer's forward math (LoRAModule.delta_forward, DoRAModule.forward)."""
        weight = torch.cat([w.float() for _, w in self.leaves], dim=0)  # _FusedLinear.unquantized_weight
        rank = self.down.shape[0]
        # PeftBase.make_weight: B.view(out, -1) @ A.view(r, -1), viewed as the layer's weight.
        lora = (self.up.float().view(self.up.size(0), -1) @ self.down.float().view(rank, -1)).view(weight.shape)
        patched = weight + lora * (self.alpha / rank)
        if self.dora_scale is not None:
            eps = torch.finfo(patched.dtype).eps  # lora_decompose_norm_epsilon defaults to True
            dims = [1] * (patched.dim() - 1)
            if self.dora_scale.shape[0] == patched.shape[0]:  # decompose_output_axis
                norm = patched.reshape(patched.shape[0], -1).norm(dim=1).reshape(patched.shape[0], *dims) + eps
            else:
                norm = patched.transpose(0, 1).reshape(patched.shape[1], -1).norm(dim=1, keepdim=True)
                norm = norm.reshape(patched.shape[1], *dims).transpose(0, 1) + eps
            patched = self.dora_scale.float() * (patched / norm)
        sizes = [w.shape[0] for _, w in self.leaves]
        return {name: part for (name, _), part in zip(self.leaves, (patched - weight).split(sizes, dim=0))}


def _ot_modules(
    model: nn.Module, prefix: str, rank: int, alpha: float, seed: int, fuse: bool, dora: str | None
) -> list[_OTModule]:
    """The modules LoRAModuleWrapper builds with the "full" layer filter (every Linear and Conv2d), trained."""
    generator = torch.Generator().manual_seed(seed)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    groups: list[tuple[str, list[str]]] = []
    consumed: set[str] = set()
    if fuse:
        blocks = sorted({name.split(".")[1] for name in layers if name.startswith("transformer_blocks.")}, key=int)
        for block in blocks:
            for attention, parts, fused in _OT_FUSION:
                leaves = [f"transformer_blocks.{block}.{attention}.{part}" for part in parts]
                groups.append((f"transformer_blocks.{block}.{fused}", leaves))
                consumed.update(leaves)
    groups += [(name, [name]) for name in layers if name not in consumed]
    modules = []
    for name, leaves in groups:
        weights = [(leaf, layers[leaf].weight.detach().clone()) for leaf in leaves]
        out = sum(w.shape[0] for _, w in weights)
        tail = tuple(weights[0][1].shape[1:])  # (in,) or (in, kh, kw)
        # LoRAModule.create_layer: a Conv2d's lora_down keeps the kernel, its lora_up is 1x1.
        down = torch.randn(rank, *tail, generator=generator) * 0.3
        up = torch.randn(out, rank, *((1, 1) if len(tail) == 3 else ()), generator=generator) * 0.3
        module = _OTModule(f"{prefix}.{name}", weights, down, up, alpha)
        if dora is not None:
            # DoRAModule.initialize_weights: the norm of the base weight along the chosen axis, then trained.
            weight = torch.cat([w for _, w in weights], dim=0).float()
            dims = [1] * (weight.dim() - 1)
            if dora == "output":
                scale = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(weight.shape[0], *dims)
            else:
                scale = weight.transpose(1, 0).reshape(weight.shape[1], -1).norm(dim=1, keepdim=True)
                scale = scale.reshape(weight.shape[1], *dims).transpose(1, 0)
            module.dora_scale = scale * (1 + 0.3 * torch.randn(scale.shape, generator=generator))
        modules.append(module)
    return modules


def _ot_state(modules: list[_OTModule]) -> dict[str, torch.Tensor]:
    """LoRAModuleWrapper.state_dict(): <prefix>.<module>.lora_down.weight / lora_up.weight / alpha (/ dora_scale)."""
    state = {}
    for module in modules:
        state[f"{module.name}.lora_down.weight"] = module.down
        state[f"{module.name}.lora_up.weight"] = module.up
        state[f"{module.name}.alpha"] = torch.tensor(module.alpha)
        if module.dora_scale is not None:
            state[f"{module.name}.dora_scale"] = module.dora_scale
    return state


def _kohya_flatten(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """convert_lora_util.kohya_flatten: dots of the module path become underscores, the value suffix stays dotted."""
    out = {}
    for key, tensor in state.items():
        if key.endswith((".alpha", ".dora_scale")):
            module, suffix = key.rsplit(".", 1)
            suffix = "." + suffix
        else:
            module, param, weight = key.rsplit(".", 2)
            suffix = f".{param}.{weight}"
        out[module.replace(".", "_") + suffix] = tensor
    return out


def _ot_original_name(name: str) -> str:
    """The denoiser body of the ORIGINAL / COMFY formats (prefix handled by the caller)."""
    if name in _OT_ORIGINAL_OUTER:
        return _OT_ORIGINAL_OUTER[name]
    _, block, inner = name.split(".", 2)
    return f"blocks.{block}.{_OT_ORIGINAL_BLOCK[inner]}"


def _ot_ab(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """convert_lora_suffix_ab(peft_convention=False): lora_down/up -> lora_A/B, alpha and dora_scale kept."""
    return {k.replace(".lora_down.weight", ".lora_A.weight").replace(".lora_up.weight", ".lora_B.weight"): v for k, v in state.items()}


def _ot_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """convert_lora_util.convert_to_diffusers: alpha folded into lora_B (lora_fold_alpha), no .alpha left; a
    per-output dora_scale becomes lora_magnitude_vector.weight (dora_scale_to_peft_magnitude); a per-input one
    (shape[0] == 1) stays dora_scale."""
    out = {}
    for key, tensor in state.items():
        if key.endswith(".dora_scale"):
            module = key[: -len(".dora_scale")]
            if tensor.shape[0] == 1:
                out[key] = tensor
            elif tensor.dim() == 2:
                out[f"{module}.lora_magnitude_vector.weight"] = tensor.reshape(tensor.shape[0])
            else:
                out[f"{module}.lora_magnitude_vector.weight"] = tensor.reshape(1, tensor.shape[0], *[1] * (tensor.dim() - 2))
        elif key.endswith(".lora_down.weight"):
            out[key.replace(".lora_down.weight", ".lora_A.weight")] = tensor
        elif key.endswith(".lora_up.weight"):
            module = key[: -len(".lora_up.weight")]
            out[f"{module}.lora_B.weight"] = tensor * (state[f"{module}.alpha"] / tensor.shape[1])
    return out


def _ot_header() -> dict[str, str]:
    """DtypeModelSaverMixin._create_safetensors_header: the model spec, then OneTrainer's git branch and revision."""
    spec = json.loads('{"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "pixart-sigma/lora", '
                      '"modelspec.implementation": "https://github.com/PixArt-alpha/PixArt-sigma", '
                      '"modelspec.title": "PixArt Sigma 1.0 LoRA"}')  # resources/sd_model_spec/pixart_sigma_1.0-lora.json
    return spec | {"modelspec.date": "2026-08-20", "ot_branch": "master", "ot_revision": OT_REVISION}


def onetrainer(
    model: str, root: Path, fmt: str, *, text_encoder: bool = True, dora: str | None = None, rank: int = 4, alpha: float = 1.0, seed: int = 0
) -> WildFile:
    """A OneTrainer PixArt-Sigma LoRA file in ``fmt`` (LEGACY, DIFFUSERS, COMFY or ORIGINAL).

    Defaults as OneTrainer's: alpha 1.0, the "full" layer filter (the patch
    embedding Conv2d included), fp32 output; ``dora`` "input" (OneTrainer's default
    axis) or "output" trains DoRA (lora_decompose); ``text_encoder`` trains T5 too
    (not in ORIGINAL, which OneTrainer refuses to write with a second component).
    The file goes where OneTrainer's default output_model_destination puts it,
    ``models/lora.safetensors``.
    """
    fuse = fmt in ("COMFY", "ORIGINAL")
    transformer = _ot_modules(load_transformer(model), "transformer", rank, alpha, seed, fuse, dora)
    text = _ot_modules(load_text_encoder(model), "text_encoder", rank, alpha, seed + 1, False, dora) if text_encoder else []
    state = _ot_state(transformer + text)
    if fmt == "LEGACY":
        # PixArtAlphaLoRASaver._convert_legacy: transformer -> lora_transformer, text_encoder -> lora_te, flattened.
        renamed = {("lora_transformer." + k[len("transformer.") :]) if k.startswith("transformer.") else ("lora_te." + k[len("text_encoder.") :]): v for k, v in state.items()}
        state = _kohya_flatten(renamed)
    elif fmt == "DIFFUSERS":
        state = _ot_diffusers(state)
    elif fmt in ("COMFY", "ORIGINAL"):
        if fmt == "ORIGINAL" and text:
            raise ValueError("OneTrainer refuses ORIGINAL with a trained text encoder")
        top = "diffusion_model." if fmt == "COMFY" else ""
        renamed = {}
        for key, tensor in state.items():
            if key.startswith("transformer."):
                module, suffix = _split_suffix(key[len("transformer.") :])
                renamed[f"{top}{_ot_original_name(module)}{suffix}"] = tensor
            else:  # COMFY: the T5's lora_text_encoders() name text_encoders.t5xxl.transformer
                renamed["text_encoders.t5xxl.transformer." + key[len("text_encoder.") :]] = tensor
        state = _ot_ab(renamed)
    else:
        raise ValueError(fmt)
    path = root / "models" / "lora.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float32).contiguous() for k, v in state.items()}, str(path), _ot_header())
    deltas = {name: d for module in transformer for name, d in module.deltas().items()}
    return WildFile(path, deltas, {name: d for module in text for name, d in module.deltas().items()})


def _split_suffix(key: str) -> tuple[str, str]:
    for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha", ".dora_scale"):
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    raise ValueError(key)


# --- PEFT-based trainers ----------------------------------------------------------------------------------


def _peft_deltas(model: nn.Module, config, adapter: str = "default") -> dict[str, torch.Tensor]:
    """alpha / r * B @ A per LoRA layer, r and alpha resolved by PEFT itself from ``config`` (its patterns, rsLoRA).

    A Conv2d's update is B @ A on the flattened A, reshaped to the conv weight.
    """
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer) and adapter in layer.lora_A:
            down, up = layer.lora_A[adapter].weight.detach(), layer.lora_B[adapter].weight.detach()
            shape = layer.get_base_layer().weight.shape
            product = (up.flatten(1) @ down.flatten(1)).reshape(shape)
            deltas[name.removeprefix("base_model.model.")] = layer.scaling[adapter] * product
    return deltas


def simpletuner(model: str, root: Path, rank: int = 4, alpha: float = 16.0, seed: int = 10) -> WildFile:
    """What SimpleTuner's save hook writes for a PixArt-Sigma LoRA: ``<checkpoint>/pytorch_lora_weights.safetensors``.

    add_lora_adapter: LoraConfig(r, lora_alpha, target_modules=DEFAULT_LORA_TARGET
    ["to_k", "to_q", "to_v", "to_out.0"]). _save_lora: get_peft_model_state_dict and
    _collate_lora_metadata (diffusers' real functions here), then
    PixArtSigmaControlNetLoraLoaderMixin.save_lora_weights, which packs both under
    "transformer." and calls diffusers' write_lora_layers (real here): the header key
    lora_adapter_metadata holds the LoraConfig as JSON, no .alpha tensors. Then
    _apply_modelspec_metadata_to_lora rewrites the file with modelspec keys added.
    """
    from diffusers.loaders.lora_base import LoraBaseMixin
    from diffusers.training_utils import _collate_lora_metadata
    from peft import LoraConfig
    from peft.functional import inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    transformer = load_transformer(model)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.1, init_lora_weights=True, target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    inject_adapter_in_model(config, transformer)
    _fill(transformer, seed)
    state = get_peft_model_state_dict(transformer)
    metadata = _collate_lora_metadata({"transformer": transformer})
    folder = root / "output" / "checkpoint-500"
    LoraBaseMixin.write_lora_layers(
        state_dict=LoraBaseMixin.pack_weights(state, "transformer"),
        save_directory=str(folder),
        is_main_process=True,
        weight_name=None,
        save_function=None,
        safe_serialization=True,
        lora_adapter_metadata=LoraBaseMixin.pack_weights(metadata["transformer_lora_adapter_metadata"], "transformer"),
    )
    path = folder / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), framework="pt") as handle:  # _append_metadata_to_safetensors
        tensors = {key: handle.get_tensor(key).clone() for key in handle.keys()}  # noqa: SIM118  (as SimpleTuner writes it)
        header = dict(handle.metadata() or {})
    header |= {"modelspec.sai_model_spec": "1.0.0", "global_step": "500", "modelspec.architecture": "pixart-sigma",
               "modelspec.implementation": "diffusers", "modelspec.title": "checkpoint-500"}
    save_file(tensors, str(path), metadata=header)
    return WildFile(path, _peft_deltas(transformer, config))


def pixart_sigma_script(model: str, root: Path, rank: int = 4, seed: int = 20) -> WildFile:
    """What train_pixart_lora_hf.py leaves in its output_dir, and the file in ``transformer_lora/``.

    LoraConfig(r=args.rank (default 4), init_lora_weights="gaussian", targets to_k,
    to_q, to_v, to_out.0, proj_in, proj_out, ff.net.0.proj, ff.net.2, proj, linear,
    linear_1, linear_2; no lora_alpha, so PEFT's default 8), get_peft_model; at the end
    ``transformer.save_pretrained(output_dir)`` (PEFT folder, alpha in adapter_config.json) and
    ``StableDiffusionPipeline.save_lora_weights(output_dir/transformer_lora, get_peft_model_state_dict(transformer))``:
    the state lands as unet_lora_layers, keys ``unet.base_model.model.*``, no alpha. Both calls are the real ones.
    """
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    config = LoraConfig(
        r=rank,
        init_lora_weights="gaussian",
        target_modules=["to_k", "to_q", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "proj", "linear", "linear_1", "linear_2"],
    )
    transformer = get_peft_model(load_transformer(model), config)
    _fill(transformer, seed)
    output_dir = root / "pixart-model-finetuned-lora"
    transformer.save_pretrained(str(output_dir))
    StableDiffusionPipeline.save_lora_weights(str(output_dir / "transformer_lora"), get_peft_model_state_dict(transformer))
    return WildFile(output_dir / "transformer_lora" / "pytorch_lora_weights.safetensors", _peft_deltas(transformer, config))


def diffusers_lora(model: str, root: Path, rslora: bool = False, seed: int = 30) -> WildFile:
    """diffusers' ``save_lora_weights(..., transformer_lora_adapter_metadata=)`` as its DiT LoRA scripts call it.

    train_dreambooth_lora_sana.py's save_model_hook: get_peft_model_state_dict, then
    SanaPipeline.save_lora_weights(output_dir, transformer_lora_layers=...,
    **_collate_lora_metadata(...)); PixArt has no such method, so the same
    save_lora_weights of a transformer-only pipeline (Sana's) runs here, with
    rank/alpha patterns and the conv patch embedding among the targets.
    """
    from diffusers.loaders.lora_pipeline import SanaLoraLoaderMixin
    from diffusers.training_utils import _collate_lora_metadata
    from peft import LoraConfig
    from peft.functional import inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    transformer = load_transformer(model)
    config = LoraConfig(
        r=4,
        lora_alpha=16.0,
        use_rslora=rslora,
        init_lora_weights="gaussian",
        target_modules=["to_k", "to_q", "to_v", "to_out.0", "proj", "ff.net.2"],
        rank_pattern={"attn2.to_q": 2},
        alpha_pattern={"attn1.to_v": 2.0, "pos_embed.proj": 6.0},
    )
    inject_adapter_in_model(config, transformer)
    _fill(transformer, seed)
    folder = root / "trained-sana-lora"
    SanaLoraLoaderMixin.save_lora_weights(
        str(folder), transformer_lora_layers=get_peft_model_state_dict(transformer), **_collate_lora_metadata({"transformer": transformer})
    )
    return WildFile(folder / "pytorch_lora_weights.safetensors", _peft_deltas(transformer, config))
