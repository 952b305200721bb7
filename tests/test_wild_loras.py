"""LoRA files from the trainers people use load with the weight change their trainer meant.

Each file comes from tests/wild_fixtures.py, written as that trainer writes it,
with the change of every layer computed by the trainer's own math. Here it goes
through the toolkit's loader (read_lora + apply_lora / apply_text_lora) onto the
tiny model; the injected PEFT adapter is then merged into the weights and the
change of each layer compared with the trainer's.
"""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from pixart_tune.adapters import lora
from pixart_tune.adapters.layouts import NO_ALPHA
from pixart_tune.adapters.loader import AdapterSpec, apply_lora, apply_text_lora, load_adapters, read_lora
from pixart_tune.adapters.merge import fuse_into, merge_weights, resize_adapter, resize_weights
from pixart_tune.errors import UserError
from pixart_tune.models import load_transformer
from tests import wild_fixtures as wild


def merged_changes(model: torch.nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """The change ``adapter`` makes to each layer's weight, read by merging it with PEFT's own merge."""
    changes = {}
    for name, layer in lora.lora_layers(model).items():
        if adapter not in layer.lora_A:
            continue
        before = layer.get_base_layer().weight.detach().clone()
        layer.merge(adapter_names=[adapter])
        changes[name] = layer.get_base_layer().weight.detach() - before
        layer.unmerge()
    return changes


def assert_changes(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, change in expected.items():
        size = change.abs().max().item()
        assert size > 1e-3, f"{name}: the trainer's file changes nothing here"
        error = (actual[name] - change).abs().max().item()
        assert error <= 1e-6 * max(size, 1.0), f"{name}: off by {error:.3g} (change up to {size:.3g})"


def check_transformer(model: str, file: wild.WildFile, adapter: str = "wild"):
    weights = read_lora(file.path)
    transformer = load_transformer(model)
    apply_lora(transformer, weights, adapter, source=str(file.path))
    assert_changes(merged_changes(transformer, adapter), file.transformer)
    return weights


def check_text_encoder(model: str, file: wild.WildFile, weights) -> None:
    text_encoder = wild.load_text_encoder(model)
    assert apply_text_lora(text_encoder, weights, "wild")
    assert_changes(merged_changes(text_encoder, "wild"), file.text_encoder)


# --- each trainer's file ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["LEGACY", "DIFFUSERS", "COMFY"])
def test_onetrainer_files_with_conv_and_t5_apply_exactly(fmt, tiny_model, tmp_path, caplog):
    file = wild.onetrainer(tiny_model, tmp_path, fmt)
    assert "pos_embed.proj" in file.transformer and file.text_encoder
    with caplog.at_level(logging.WARNING):
        weights = check_transformer(tiny_model, file)
    check_text_encoder(tiny_model, file, weights)
    expected_source = "folded into lora_B" if fmt == "DIFFUSERS" else "alpha tensors"
    assert expected_source in weights.alpha_source and expected_source in weights.text_encoder.alpha_source
    assert "guess" not in caplog.text


@pytest.mark.parametrize("fmt", ["ORIGINAL", "LEGACY", "DIFFUSERS"])
@pytest.mark.parametrize("axis", ["input", "output"])
def test_onetrainer_dora_equals_its_own_forward_math(fmt, axis, tiny_model, tmp_path):
    """OneTrainer's DoRAModule on every layer (fused q/k/v in ORIGINAL), on either axis, T5 included where the format allows."""
    file = wild.onetrainer(tiny_model, tmp_path, fmt, dora=axis, text_encoder=fmt != "ORIGINAL")
    weights = check_transformer(tiny_model, file)
    assert bool(weights.dora_inputs) == (axis == "input") and bool(weights.dora_magnitudes) == (axis == "output")
    if file.text_encoder:
        check_text_encoder(tiny_model, file, weights)


def test_simpletuner_file_takes_alpha_from_lora_adapter_metadata(tiny_model, tmp_path):
    file = wild.simpletuner(tiny_model, tmp_path)
    weights = check_transformer(tiny_model, file)
    assert weights.alpha_source == "the lora_adapter_metadata header"
    assert {m.scale for m in weights.modules.values()} == {4.0}


@pytest.mark.parametrize("rslora", [False, True])
def test_diffusers_save_lora_weights_metadata_with_patterns_and_conv(rslora, tiny_model, tmp_path):
    file = wild.diffusers_lora(tiny_model, tmp_path, rslora=rslora)
    weights = check_transformer(tiny_model, file)
    assert weights.modules["transformer_blocks.0.attn2.to_q"].rank == 2
    assert weights.modules["pos_embed.proj"].down.shape == (4, 4, 2, 2)


def test_pixart_sigma_script_file_takes_alpha_from_the_run_folder(tiny_model, tmp_path):
    file = wild.pixart_sigma_script(tiny_model, tmp_path)
    assert file.path.parent.name == "transformer_lora" and "pos_embed.proj" in file.transformer
    weights = check_transformer(tiny_model, file)
    assert weights.alpha_source == "adapter_config.json one folder up" and weights.layout == "peft-unet"
    # The PEFT folder the script saves beside it reads the same.
    folder = read_lora(file.path.parent.parent)
    transformer = load_transformer(tiny_model)
    apply_lora(transformer, folder, "folder")
    assert_changes(merged_changes(transformer, "folder"), file.transformer)


def test_a_file_without_alpha_anywhere_warns_that_its_strength_is_a_guess(tiny_model, tmp_path, caplog):
    file = wild.pixart_sigma_script(tiny_model, tmp_path)
    (file.path.parent.parent / "adapter_config.json").unlink()
    with caplog.at_level(logging.WARNING):
        weights = read_lora(file.path)
    assert weights.alpha_guessed and weights.alpha_source == NO_ALPHA
    assert str(file.path) in caplog.text and "strength is a guess" in caplog.text
    assert {m.scale for m in weights.modules.values()} == {1.0}


def test_load_adapters_applies_the_t5_part_where_t5_is_given_and_warns_where_not(tiny_model, tmp_path, caplog):
    file = wild.onetrainer(tiny_model, tmp_path, "COMFY")
    text_encoder = wild.load_text_encoder(tiny_model)
    transformer = load_transformer(tiny_model)
    [name] = load_adapters(transformer, [AdapterSpec(str(file.path), 0.5)], text_encoder=text_encoder)
    half = {k: 0.5 * v for k, v in file.text_encoder.items()}
    assert_changes(merged_changes(text_encoder, name), half)
    with caplog.at_level(logging.WARNING):
        load_adapters(load_transformer(tiny_model), [AdapterSpec(str(file.path))])
    assert "text-encoder (T5) part of this LoRA is not applied" in caplog.text


def test_merge_resize_and_fuse_handle_the_conv_lora(tiny_model, tmp_path, caplog):
    file = wild.pixart_sigma_script(tiny_model, tmp_path)
    weights = read_lora(file.path)
    conv = weights.modules["pos_embed.proj"]
    doubled = merge_weights([weights, weights], [0.5, 1.5], "cat").weights.modules["pos_embed.proj"]
    assert torch.allclose(doubled.delta(), 2 * conv.delta(), atol=1e-6)
    exact = merge_weights([weights], [1.0], "svd", rank=8).weights.modules["pos_embed.proj"]
    assert exact.down.shape[1:] == (4, 2, 2) and exact.up.shape[2:] == (1, 1)
    assert torch.allclose(exact.delta(), conv.delta(), atol=1e-5)
    small = resize_weights(weights, 1).weights.modules["pos_embed.proj"]
    u, s, vh = torch.linalg.svd(conv.delta().flatten(1).double())
    assert torch.allclose(small.delta().flatten(1).double(), (u[:, :1] * s[:1]) @ vh[:1], atol=1e-5)
    transformer = load_transformer(tiny_model)
    base = transformer.pos_embed.proj.weight.detach().clone()
    fuse_into(transformer, [weights], [1.0])
    assert type(transformer.pos_embed.proj) is torch.nn.Conv2d
    assert torch.allclose(transformer.pos_embed.proj.weight - base, file.transformer["pos_embed.proj"], atol=1e-6)
    # A file that also trained T5 resizes its transformer part, and says so.
    with caplog.at_level(logging.WARNING):
        resize_adapter(wild.onetrainer(tiny_model, tmp_path / "ot", "LEGACY").path, tmp_path / "small", 2)
    assert "text-encoder (T5) part of this LoRA is not applied" in caplog.text


# --- what careless users hand over -------------------------------------------------------------------------


def _legacy_state(tiny_model, tmp_path) -> dict[str, torch.Tensor]:
    return load_file(str(wild.onetrainer(tiny_model, tmp_path, "LEGACY").path))


def _conv_wrong_kernel(state):
    key = "lora_transformer_pos_embed_proj.lora_down.weight"
    state[key] = torch.randn(state[key].shape[0], 4, 3, 3)


def _conv_up_not_1x1(state):
    key = "lora_transformer_pos_embed_proj.lora_up.weight"
    state[key] = torch.randn(state[key].shape[0], state[key].shape[1], 2, 2)


def _linear_lora_on_the_conv(state):
    state["lora_transformer_pos_embed_proj.lora_down.weight"] = torch.randn(4, 16)
    state["lora_transformer_pos_embed_proj.lora_up.weight"] = torch.randn(32, 4)


def _t5_only(state):
    for key in [k for k in state if k.startswith("lora_transformer_")]:
        del state[key]


def _clip_text_encoder(state):
    state["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.randn(4, 32)
    state["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.randn(32, 4)


def _dora_scale_wrong_size(state):
    state["lora_transformer_proj_out.dora_scale"] = torch.ones(1, 7)


FAULTS = {
    "conv LoRA with a 3x3 kernel for the 2x2 patch embedding": (_conv_wrong_kernel, None, r"3x3 kernel .* 2x2 kernel"),
    "conv LoRA whose up weight is not 1x1": (_conv_up_not_1x1, None, r"nor a Conv2d LoRA"),
    "linear LoRA on the patch embedding Conv2d": (_linear_lora_on_the_conv, None, r"is a linear LoRA but this model's layer is a Conv2d"),
    "text-encoder part only": (_t5_only, None, r"only a text-encoder \(T5\) LoRA"),
    "a CLIP text-encoder part": (_clip_text_encoder, None, r"not for T5"),
    "dora_scale of the wrong size": (_dora_scale_wrong_size, None, r"dora_scale \(1, 7\) fits neither"),
    "broken lora_adapter_metadata JSON": (None, {"lora_adapter_metadata": '{"transformer.r": 4,'}, r"lora_adapter_metadata.*not valid JSON"),
    "lora_adapter_metadata alpha that is not a number": (None, {"lora_adapter_metadata": '{"transformer.lora_alpha": "sixteen"}'}, r"transformer\.lora_alpha = 'sixteen', not a number"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_careless_file_is_refused_in_one_line_naming_it(fault, tiny_model, tmp_path):
    edit, header, message = FAULTS[fault]
    state = _legacy_state(tiny_model, tmp_path)
    if edit:
        edit(state)
    if header:  # alpha from the header: drop the .alpha tensors so it is read
        state = {k: v for k, v in state.items() if not k.endswith(".alpha")}
    bad = tmp_path / "careless.safetensors"
    save_file(state, str(bad), header)
    with pytest.raises(UserError) as caught:
        load_adapters(load_transformer(tiny_model), [AdapterSpec(str(bad))])
    text = str(caught.value)
    assert str(bad) in text and "\n" not in text, text
    assert re.search(message, text), text


def test_a_broken_sidecar_is_passed_over_with_a_warning(tiny_model, tmp_path, caplog):
    file = wild.pixart_sigma_script(tiny_model, tmp_path)
    (file.path.parent.parent / "adapter_config.json").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        weights = read_lora(file.path)
    assert weights.alpha_guessed and "not readable JSON" in caplog.text


def test_alpha_sources_follow_the_documented_order(tiny_model, tmp_path):
    """Tensors beat the header, the header beats a sidecar, a sidecar beats the parent folder's config."""
    file = wild.pixart_sigma_script(tiny_model, tmp_path)
    state = load_file(str(file.path))
    sidecar = file.path.with_suffix(".json")
    sidecar.write_text(json.dumps({"lora_alpha": 2.0}))
    assert read_lora(file.path).alpha_source == f"{sidecar.name} beside it"
    save_file(state, str(file.path), {"lora_alpha": "3.0"})
    assert {m.alpha for m in read_lora(file.path).modules.values()} == {3.0}
    metadata = json.dumps({"transformer.r": 4, "transformer.lora_alpha": 12})
    save_file(state, str(file.path), {"lora_alpha": "3.0", "lora_adapter_metadata": metadata})
    assert {m.alpha for m in read_lora(file.path).modules.values()} == {12.0}
    with_tensors = state | {k.replace(".lora_A.weight", ".alpha"): torch.tensor(5.0) for k in state if k.endswith(".lora_A.weight")}
    save_file(with_tensors, str(file.path), {"lora_adapter_metadata": metadata})
    weights = read_lora(file.path)
    assert {m.alpha for m in weights.modules.values()} == {5.0} and weights.alpha_source == "alpha tensors in the file"
