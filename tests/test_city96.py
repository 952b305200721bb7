"""What city96's ComfyUI_ExtraModels "PixArt Load LoRA" node does with each export, found by running its code.

``tests/city96_loader.py`` is that node's loader, vendored (key conversion, alpha,
and the patch code it shipped for ComfyUI before 0.1.1) with ComfyUI's own LoRA
patch code of 0.1.1 and later beside it. Every export of adapters trained on
attention only, on every linear layer, and on a few scattered layers goes through
it; the weight changes it would patch are compared, layer by layer of the original
checkpoint it patches, with the ones ``merge --fuse`` writes into the model.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pixart_tune.adapters import lora
from pixart_tune.adapters.export import FORMATS, export_adapter, export_file
from pixart_tune.adapters.layouts import LoraModule, LoraWeights, to_state_dict
from pixart_tune.adapters.loader import AdapterSpec, read_lora
from pixart_tune.adapters.merge import fuse_adapters
from pixart_tune.models import load_transformer
from tests import city96_loader as city96
from tests.adapter_fixtures import filled_transformer

# The original checkpoint's layers (what ComfyUI's PixArt model has), by the diffusers layers stacked in each.
_BLOCK = {
    "attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "attn.proj": ("attn1.to_out.0",),
    "cross_attn.q_linear": ("attn2.to_q",),
    "cross_attn.kv_linear": ("attn2.to_k", "attn2.to_v"),
    "cross_attn.proj": ("attn2.to_out.0",),
    "mlp.fc1": ("ff.net.0.proj",),
    "mlp.fc2": ("ff.net.2",),
}
_OUTER = {
    "t_block.1": ("adaln_single.linear",),
    "t_embedder.mlp.0": ("adaln_single.emb.timestep_embedder.linear_1",),
    "t_embedder.mlp.2": ("adaln_single.emb.timestep_embedder.linear_2",),
    "y_embedder.y_proj.fc1": ("caption_projection.linear_1",),
    "y_embedder.y_proj.fc2": ("caption_projection.linear_2",),
    "final_layer.linear": ("proj_out",),
    "x_embedder.proj": ("pos_embed.proj",),
}
FUSED = ("attn.qkv", "cross_attn.kv_linear")
SPARSE = r"transformer_blocks\.1\.attn2\.to_(q|k)|transformer_blocks\.1\.ff\.net\.2|proj_out"
TARGETS = {"attention": (4, 8.0, "attention"), "all_linear": (3, 5.0, "all_linear"), "sparse": (2, 3.0, SPARSE)}


def original_layers(num_layers: int) -> dict[str, tuple[str, ...]]:
    """``diffusion_model.<original name>.weight`` -> diffusers names whose weights it stacks."""
    layers = {f"diffusion_model.{k}.weight": v for k, v in _OUTER.items()}
    for block in range(num_layers):
        for original, parts in _BLOCK.items():
            layers[f"diffusion_model.blocks.{block}.{original}.weight"] = tuple(f"transformer_blocks.{block}.{p}" for p in parts)
    return layers


def layer_of(key: str) -> str:
    """``diffusion_model.blocks.0.attn.qkv.weight`` -> ``attn.qkv``; outside the blocks the original name."""
    name = key[len("diffusion_model."):-len(".weight")]
    return name.split(".", 2)[2] if name.startswith("blocks.") else name


def original_weights(transformer) -> dict[str, torch.Tensor]:
    layers = original_layers(transformer.config.num_layers)
    return {key: torch.cat([transformer.get_submodule(p).weight.detach().float() for p in parts]) for key, parts in layers.items()}


@pytest.fixture(scope="module")
def base(tiny_model):
    return original_weights(load_transformer(tiny_model))


@pytest.fixture(scope="module")
def trained(tiny_model, base, tmp_path_factory):
    """Per target set: (adapter folder, the weight changes merge --fuse makes, in original layers)."""
    out = {}
    for key, (rank, alpha, targets) in TARGETS.items():
        root = tmp_path_factory.mktemp(f"city96_{key}")
        settings = lora.LoraSettings(rank=rank, alpha=alpha, targets=targets)
        path = lora.save_adapter(filled_transformer(tiny_model, settings, seed=5), root / "adapter", settings)
        fused = fuse_adapters(tiny_model, [AdapterSpec(str(path))], root / "fused")
        after = original_weights(load_transformer(str(fused)))
        out[key] = path, {k: after[k] - base[k] for k in base}
    return out


def city96_load(file: Path):
    """Runs the node's loader on a file as the node does; returns (patcher, what it printed)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        patcher = city96.load_pixart_lora(city96.ModelPatcher(ALL_KEYS), load_file(str(file)), str(file), 1.0)
    return patcher, printed.getvalue()


ALL_KEYS = list(original_layers(2))


def patched(patcher, base: dict[str, torch.Tensor], current: bool) -> dict[str, torch.Tensor]:
    """The change to each original weight: ComfyUI >= 0.1.1's patch code (``current``) or city96's own."""
    deltas = {}
    for key, patches in patcher.patches.items():
        weight = base[key].clone()
        if current:
            new = city96.calculate_weight_current(patches, weight.clone(), key)
        else:
            new = patcher.calculate_weight(patches, weight.clone(), key)
        deltas[key] = new - weight
    return deltas


def assert_same(actual: torch.Tensor, expected: torch.Tensor, key: str) -> None:
    assert torch.allclose(actual, expected, atol=1e-6, rtol=1e-5), f"{key}: max diff {(actual - expected).abs().max():.3g}"


@pytest.mark.parametrize("targets", list(TARGETS))
def test_the_onetrainer_export_loads_in_city96_with_every_layer_it_can_apply_exact(targets, trained, base, tmp_path, caplog):
    path, expected = trained[targets]
    [file] = export_adapter(path, ["onetrainer"], tmp_path / "x.safetensors")
    patcher, printed = city96_load(file)
    assert "NOT LOADED" not in printed
    trained_keys = {k for k, d in expected.items() if d.abs().max() > 0}
    assert trained_keys and trained_keys <= set(patcher.patches)
    with caplog.at_level(logging.ERROR, logger=city96.__name__):
        current = patched(patcher, base, current=True)
    before = patched(patcher, base, current=False)
    for key, delta in expected.items():
        if layer_of(key) not in FUSED:
            # Exact on ComfyUI today and before 0.1.1 alike (zero where nothing was trained).
            assert_same(current.get(key, torch.zeros_like(delta)), delta, key)
            assert_same(before.get(key, torch.zeros_like(delta)), delta, key)
            continue
        # ComfyUI >= 0.1.1: the stacked q/k/v (k/v) LoRA does not multiply; an error is logged, nothing applied.
        assert not current[key].any(), key
        assert any(key in record.getMessage() for record in caplog.records), key
        # Before 0.1.1 city96's code applied it, dividing alpha by the stacked rank (3 or 2 parts).
        assert_same(before[key], delta / (3 if layer_of(key) == "attn.qkv" else 2), key)


def test_mixed_ranks_within_a_fused_group_load_and_read_back_exactly(tiny_model, base, tmp_path):
    """Merged or resized adapters can hold q, k, v LoRAs of different ranks; city96 stacks them, so they are padded."""
    generator = torch.Generator().manual_seed(3)
    width = next(iter(base.values())).shape[1]

    def module(rank: int, alpha: float) -> LoraModule:
        return LoraModule(torch.randn(rank, width, generator=generator), torch.randn(width, rank, generator=generator), alpha)

    weights = LoraWeights({"transformer_blocks.0.attn1.to_q": module(2, 1.0), "transformer_blocks.0.attn1.to_k": module(3, 6.0)})
    file = export_file(weights, "onetrainer", tmp_path / "mixed.safetensors")
    patcher, _ = city96_load(file)
    before = patched(patcher, base, current=False)["diffusion_model.blocks.0.attn.qkv.weight"]
    stacked = torch.cat([weights.modules["transformer_blocks.0.attn1.to_q"].delta(), weights.modules["transformer_blocks.0.attn1.to_k"].delta(),
                         torch.zeros(width, width)])
    assert_same(before, stacked / 3, "attn.qkv")
    back = read_lora(file)
    for name, module in back.modules.items():
        assert_same(module.delta(), weights.modules[name].delta() if name in weights.modules else torch.zeros(width, width), name)


# What the node does with every other file of the toolkit (layouts outside FORMATS written directly).
def _outcome(fmt: str, targets: str) -> str:
    if fmt in ("comfyui", "pixart"):
        return "AssertionError: Unable to detect model depth!"
    if fmt == "onetrainer":
        return "loads"
    return "peft" if targets == "all_linear" else "KeyError: 'transformer_blocks_0_attn1_to_q.lora_down.weight'"


@pytest.mark.parametrize("targets", ["attention", "all_linear"])
@pytest.mark.parametrize("fmt", [*FORMATS, "peft", "peft-model", "peft-unet"])
def test_what_city96_does_with_each_file(fmt, targets, trained, base, tmp_path):
    path, expected = trained[targets]
    file = tmp_path / f"x_{fmt}.safetensors"
    if fmt in FORMATS:
        export_adapter(path, [fmt], file)
    else:
        save_file(to_state_dict(read_lora(path), fmt), str(file))
    outcome = _outcome(fmt, targets)
    if outcome not in ("loads", "peft"):
        with pytest.raises(Exception) as raised:
            city96_load(file)
        assert f"{type(raised.value).__name__}: {raised.value}" == outcome
        return
    patcher, printed = city96_load(file)
    if outcome == "loads":
        return
    # Read as PEFT: the .alpha tensors are ignored and, with no JSON beside the file, alpha 8 is assumed.
    assert "assuming alpha of 8" in printed
    alpha = TARGETS[targets][1]
    current = patched(patcher, base, current=True)
    for key, delta in expected.items():
        if layer_of(key) in FUSED:
            assert not current[key].any(), key
        elif delta.any():
            assert_same(current[key], delta * 8.0 / alpha, key)


def test_the_publish_folders_peft_file_takes_alpha_from_its_config(trained, base, tmp_path):
    """Beside adapter_config.json (as in a publish folder) the PEFT file's alpha is right; q/k/v still go missing."""
    path, expected = trained["all_linear"]
    folder = tmp_path / "peft"
    shutil.copytree(path, folder)
    assert json.loads((folder / "adapter_config.json").read_text())["lora_alpha"] == TARGETS["all_linear"][1]
    patcher, printed = city96_load(folder / "adapter_model.safetensors")
    assert "Found config" in printed
    current = patched(patcher, base, current=True)
    for key, delta in expected.items():
        if layer_of(key) in FUSED:
            assert not current[key].any(), key
        elif delta.any():
            assert_same(current[key], delta, key)
