"""LyCORIS adapters written by the reference implementation, and ComfyUI core's way of applying them.

Writer: the ``lycoris-lora`` package (4.1.3 read; installed with the ``test`` extra).
``lycoris/wrapper.py``: ``create_lycoris`` wraps every Linear and Conv2d of a model
(names ``<LORA_PREFIX>_<module path with "." -> "_">``, prefix ``lycoris`` by default,
``lora_unet`` as kohya-style trainers set it); ``LycorisNetwork.save_weights`` writes
``state_dict()``, whose per-module tensors come from ``custom_state_dict`` in
``lycoris/modules/lokr.py`` / ``loha.py`` (``alpha`` as a 0-dim tensor, the scalar
folded into ``w1``). LyCORIS initialises one factor to zero, so the fixtures fill every
parameter with seeded random values before saving. What a module adds during training
is ``get_weight(shape) * scalar`` (``_rebuild_forward``), the reference for the tests.

Reader: ComfyUI is not pip-installable, so its loader is re-implemented here from
``comfy/lora.py`` (``load_lora``: ``alpha = lora[x + ".alpha"].item()``;
``model_lora_keys_unet``, PixArt branch: ``diffusion_model.`` + original names, and
``transformer.`` + diffusers names mapped by ``pixart_to_diffusers`` with q/k/v as row
slices of ``attn.qkv``; ComfyUI a125cd8 as recorded in the project's notes) and
``comfy/weight_adapter/lokr.py`` (e8f3bc5) / ``loha.py`` (17adbb5) ``calculate_weight``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import PixArtTransformer2DModel
from safetensors.torch import load_file

from pixart_tune.tiny import tiny_transformer_config


def tiny_transformer(layers: int = 2, seed: int = 0) -> PixArtTransformer2DModel:
    torch.manual_seed(seed)
    return PixArtTransformer2DModel.from_config(tiny_transformer_config(layers=layers)).eval()


def layer_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Weight shape of every Linear and Conv2d, by module name."""
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def lycoris_network(model: torch.nn.Module, seed: int, prefix: str = "lycoris", **kwargs):
    """``create_lycoris`` on ``model`` (in place) with every LyCORIS parameter seeded random, applied."""
    from lycoris import LycorisNetwork, create_lycoris

    saved = LycorisNetwork.LORA_PREFIX
    LycorisNetwork.LORA_PREFIX = prefix  # the "full" preset keeps it; kohya-style trainers set "lora_unet"
    try:
        network = create_lycoris(model, 1.0, **kwargs)
    finally:
        LycorisNetwork.LORA_PREFIX = saved
    network.apply_to()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            assert ".org_module" not in name, name  # the wrapped layer is not LyCORIS' own
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return network


def saved_state(network, path: Path) -> dict[str, torch.Tensor]:
    """What LyCORIS writes (``LycorisNetwork.save_weights``, fp32 safetensors), read back."""
    network.save_weights(str(path), torch.float32, {})
    return load_file(str(path))


def trained_updates(network) -> dict[str, torch.Tensor]:
    """LyCORIS module name -> the update its training forward adds (``get_weight(shape) * scalar``)."""
    with torch.no_grad():
        return {m.lora_name: (m.get_weight(m.shape) * m.scalar).float() for m in network.loras}


class _Attention(torch.nn.Module):
    def __init__(self, width: int, fused: dict[str, int]) -> None:
        super().__init__()
        for name, parts in fused.items():
            setattr(self, name, torch.nn.Linear(width, width * parts))
        self.proj = torch.nn.Linear(width, width)


class OriginalBlocks(torch.nn.Module):
    """The original PixArt checkpoint's block layers (``blocks.N.attn.qkv`` ...), at the tiny model's sizes."""

    def __init__(self, layers: int = 1, width: int = 32, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = torch.nn.ModuleList()
        for _ in range(layers):
            block = torch.nn.Module()
            block.attn = _Attention(width, {"qkv": 3})
            block.cross_attn = _Attention(width, {"q_linear": 1, "kv_linear": 2})
            block.mlp = torch.nn.Module()
            block.mlp.fc1, block.mlp.fc2 = torch.nn.Linear(width, 4 * width), torch.nn.Linear(4 * width, width)
            self.blocks.append(block)


# --- ComfyUI core, re-implemented -----------------------------------------------------------------

# pixart_to_diffusers, per block: diffusers name -> (original name, part index, parts).
_BLOCK = {
    "attn1.to_q": ("attn.qkv", 0, 3), "attn1.to_k": ("attn.qkv", 1, 3), "attn1.to_v": ("attn.qkv", 2, 3),
    "attn1.to_out.0": ("attn.proj", 0, 1), "attn2.to_q": ("cross_attn.q_linear", 0, 1),
    "attn2.to_k": ("cross_attn.kv_linear", 0, 2), "attn2.to_v": ("cross_attn.kv_linear", 1, 2),
    "attn2.to_out.0": ("cross_attn.proj", 0, 1), "ff.net.0.proj": ("mlp.fc1", 0, 1), "ff.net.2": ("mlp.fc2", 0, 1),
}
_OUTER = {
    "pos_embed.proj": "x_embedder.proj", "proj_out": "final_layer.linear", "adaln_single.linear": "t_block.1",
    "adaln_single.emb.timestep_embedder.linear_1": "t_embedder.mlp.0", "adaln_single.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "caption_projection.linear_1": "y_embedder.y_proj.fc1", "caption_projection.linear_2": "y_embedder.y_proj.fc2",
}


def comfy_key_map(model: torch.nn.Module) -> dict[str, tuple[str, int, int]]:
    """LoRA key -> (original weight name, first row, rows) as ComfyUI maps it for PixArt (rows -1: the whole weight)."""
    shapes = layer_shapes(model)
    key_map = {}
    for name in shapes:
        if name in _OUTER:
            target, index, parts = _OUTER[name], 0, 1
        else:
            block, inner = name.split(".", 2)[1], name.split(".", 2)[2]
            original, index, parts = _BLOCK[inner]
            target = f"blocks.{block}.{original}"
        rows = shapes[name][0]
        key_map[f"transformer.{name}"] = (target, index * rows if parts > 1 else 0, rows if parts > 1 else -1)
        key_map[f"diffusion_model.{target}"] = (target, 0, -1)
    return key_map


def comfy_apply(state: dict[str, torch.Tensor], key_map: dict, weights: dict[str, torch.Tensor]) -> set[str]:
    """``load_lora`` + ``calculate_weight`` (strength 1) of every LoKr/LoHa module into ``weights``; returns the keys used."""
    used = set()
    for x, (target, start, rows) in key_map.items():
        alpha = state[f"{x}.alpha"].item() if f"{x}.alpha" in state else None
        weight = weights[target] if rows < 0 else weights[target].narrow(0, start, rows)
        if f"{x}.hada_w1_a" in state:
            make = _comfy_loha
        elif any(f"{x}.lokr_{n}" in state for n in ("w1", "w2", "w1_a", "w2_a")):
            make = _comfy_lokr
        else:
            continue
        try:  # calculate_weight logs "ERROR lokr <key> <error>" and leaves the weight as it was
            diff, scale, used_keys = make(state, x, alpha)
            weight += (scale * diff).reshape(weight.shape)
        except RuntimeError:
            continue
        used |= used_keys | ({f"{x}.alpha"} if alpha is not None else set())
    return used


def _comfy_lokr(state, x, alpha):
    get = lambda n: state.get(f"{x}.lokr_{n}")  # noqa: E731
    w1, w2, w1_a, w1_b, w2_a, w2_b, t2 = (get(n) for n in ("w1", "w2", "w1_a", "w1_b", "w2_a", "w2_b", "t2"))
    dim = None
    if w1 is None:
        dim = w1_b.shape[0]
        w1 = torch.mm(w1_a.float(), w1_b.float())
    if w2 is None:
        dim = w2_b.shape[0]
        if t2 is None:
            w2 = torch.mm(w2_a.float(), w2_b.float())
        else:
            w2 = torch.einsum("i j k l, j r, i p -> p r k l", t2.float(), w2_b.float(), w2_a.float())
    w1, w2 = w1.float(), w2.float()
    if len(w2.shape) == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    keys = {f"{x}.lokr_{n}" for n in ("w1", "w2", "w1_a", "w1_b", "w2_a", "w2_b", "t2") if f"{x}.lokr_{n}" in state}
    return torch.kron(w1, w2), scale, keys


def _comfy_loha(state, x, alpha):
    w1a, w1b, w2a, w2b = (state[f"{x}.hada_{n}"].float() for n in ("w1_a", "w1_b", "w2_a", "w2_b"))
    scale = alpha / w1b.shape[0] if alpha is not None else 1.0
    keys = {f"{x}.hada_{n}" for n in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2") if f"{x}.hada_{n}" in state}
    if f"{x}.hada_t1" in state:
        t1, t2 = state[f"{x}.hada_t1"].float(), state[f"{x}.hada_t2"].float()
        m1 = torch.einsum("i j k l, j r, i p -> p r k l", t1, w1b, w1a)
        m2 = torch.einsum("i j k l, j r, i p -> p r k l", t2, w2b, w2a)
    else:
        m1, m2 = torch.mm(w1a, w1b), torch.mm(w2a, w2b)
    return m1 * m2, scale, keys


def original_zeros(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Zero weights of the original checkpoint's layers (fused q/k/v stacked), for collecting updates."""
    shapes, out = layer_shapes(model), {}
    for key, (target, _, _) in comfy_key_map(model).items():
        if key.startswith("transformer."):
            shape = shapes[key[len("transformer."):]]
            parts = 3 if target.endswith("qkv") else 2 if target.endswith("kv_linear") else 1
            out[target] = torch.zeros(shape[0] * parts, *shape[1:])
    return out
