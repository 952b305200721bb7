"""LoKr and LoHa end to end: files written by lycoris-lora load through the one loader, switch and scale like
LoRAs, go through the pipeline LoRA methods, merge, fuse and export for ComfyUI core; ``lora.type: lokr`` trains.

The reference updates are what LyCORIS' own modules add in training (``tests/lycoris_fixtures.py``); the
ComfyUI check is the re-implementation of its loader cited there.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import PixArtSigmaPipeline
from safetensors.torch import load_file, save_file

from pixart_tune.adapters import lora
from pixart_tune.adapters import pipeline_lora  # noqa: F401  (gives PixArtSigmaPipeline the LoRA methods)
from pixart_tune.adapters.export import export_file
from pixart_tune.adapters.layouts import LoraWeights, to_state_dict, underscored
from pixart_tune.adapters.loader import apply_lora, read_lora
from pixart_tune.adapters.merge import MergeConfig, fuse_into, merge, merge_weights
from pixart_tune.errors import UserError
from pixart_tune.models import load_transformer
from tests.adapter_fixtures import assert_close, make_adapter, output
from tests.lycoris_fixtures import comfy_apply, comfy_key_map, layer_shapes, lycoris_network, original_zeros, saved_state, trained_updates
from tests.training_fixtures import red_dataset, tiny_config  # noqa: F401  (red_dataset: a fixture)

pytest.importorskip("lycoris")
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")

# lycoris-lora settings (tiny model: width 32, the patch conv 4 -> 32 with kernel 2).
SETTINGS = {
    "lokr": dict(algo="lokr", linear_dim=2, linear_alpha=6, conv_dim=1, conv_alpha=3, use_tucker=True),
    "loha": dict(algo="loha", linear_dim=2, linear_alpha=5, conv_dim=2, conv_alpha=1),
}


@pytest.fixture(scope="module")
def written(tiny_model, tmp_path_factory):
    """kind -> (file written by LyCORIS, transformer with LyCORIS applied, update per diffusers name)."""
    root, out = tmp_path_factory.mktemp("lycoris"), {}
    for seed, (kind, settings) in enumerate(SETTINGS.items(), start=1):
        model = load_transformer(tiny_model).eval()
        names = {f"lycoris_{underscored(n)}": n for n in layer_shapes(model)}
        network = lycoris_network(model, seed, **settings)
        path = root / f"{kind}.safetensors"
        saved_state(network, path)
        out[kind] = (path, model, {names[k]: v for k, v in trained_updates(network).items()})
    return out


def _layers(transformer, adapter_name):
    return {n: layer for n, layer in lora.lora_layers(transformer).items() if lora.has_adapter(layer, adapter_name)}


@pytest.mark.parametrize("kind", list(SETTINGS))
def test_lycoris_files_apply_switch_and_scale_like_loras(kind, written, tiny_model):
    path, applied, updates = written[kind]
    weights = read_lora(path)
    assert not weights.modules and sorted(weights.lycoris) == sorted(updates)
    transformer = load_transformer(tiny_model).eval()
    base = output(transformer)
    apply_lora(transformer, weights, "a", source=str(path))
    with torch.no_grad():
        assert_close(output(transformer), output(applied), base, tol=1e-5)
        lora.set_scale(transformer, "a", 0.5)  # the Sampler's strength: half the update on every layer
        for name, layer in _layers(transformer, "a").items():
            torch.testing.assert_close(layer.get_delta_weight("a"), 0.5 * updates[name].reshape(layer.get_base_layer().weight.shape), atol=1e-6, rtol=1e-6)
        lora.activate(transformer, [])
        assert torch.equal(output(transformer), base)
        lora.activate(transformer, ["a"])
        assert not torch.equal(output(transformer), base)
        lora.remove(transformer, "a")
        assert not _layers(transformer, "a") and torch.equal(output(transformer), base)


def test_a_mixed_file_applies_its_lora_and_its_lokr_under_one_name(written, tiny_model, tmp_path):
    path, _, updates = written["lokr"]
    lokr = {k: v for k, v in load_file(str(path)).items() if "_ff_" in k}  # LoKr on the feed-forward layers
    plain = read_lora(make_adapter(tiny_model, tmp_path / "plain", seed=3, targets="attention"))
    mixed = tmp_path / "mixed.safetensors"
    save_file({**to_state_dict(plain, "diffusers"), **lokr}, str(mixed))
    weights = read_lora(mixed)
    assert sorted(weights.modules) == sorted(plain.modules) and all(".ff." in n for n in weights.lycoris) and weights.lycoris
    one, two = load_transformer(tiny_model).eval(), load_transformer(tiny_model).eval()
    apply_lora(one, weights, "mixed")
    apply_lora(two, LoraWeights(plain.modules), "lora")
    apply_lora(two, LoraWeights({}, lycoris=weights.lycoris), "lokr")
    lora.activate(two, ["lora", "lokr"])
    with torch.no_grad():
        assert_close(output(one), output(two), output(load_transformer(tiny_model)), tol=1e-5)


def test_the_pipeline_lora_methods_load_scale_fuse_and_unload_a_lokr_file(written, tiny_model):
    path, applied, _ = written["lokr"]
    pipe = PixArtSigmaPipeline.from_pretrained(tiny_model)
    transformer = pipe.transformer.eval()
    base, weights_before = output(transformer), {k: v.clone() for k, v in transformer.state_dict().items()}
    pipe.load_lora_weights(str(path), adapter_name="lokr")
    assert pipe.get_active_adapters() == ["lokr"]
    with torch.no_grad():
        full = output(transformer)
        assert_close(full, output(applied), base, tol=1e-5)
        pipe.set_adapters(["lokr"], [0.0])
        assert torch.allclose(output(transformer), base, atol=1e-6)
        pipe.set_adapters(["lokr"], [1.0])
        pipe.fuse_lora()
        assert_close(output(transformer), full, tol=1e-5)
        pipe.unfuse_lora()
        assert_close(output(transformer), full, tol=1e-6)
        pipe.unload_lora_weights()
        assert torch.equal(output(transformer), base)
    assert all(torch.equal(v, weights_before[k]) for k, v in transformer.state_dict().items())


def test_merging_sums_full_updates_svd_gives_a_lora_and_fuse_bakes_them_in(written, tiny_model, tmp_path):
    (lokr_path, _, lokr), (loha_path, _, loha) = written["lokr"], written["loha"]
    adapters = [read_lora(lokr_path), read_lora(loha_path)]
    expected = {name: lokr[name] + 0.5 * loha[name] for name in lokr}
    shapes = layer_shapes(load_transformer(tiny_model))

    merged = merge_weights(adapters, [1.0, 0.5], "linear").weights
    assert not merged.modules and sorted(merged.lycoris) == sorted(expected)
    for name, delta in expected.items():
        torch.testing.assert_close(merged.lycoris[name].delta().reshape(shapes[name]), delta.reshape(shapes[name]), atol=1e-6, rtol=1e-6)

    # svd at a rank that holds every update (the tiny layers are at most 32 x 128) is exact, and a plain LoRA.
    result = merge_weights(adapters, [1.0, 0.5], "svd", rank=32)
    assert not result.weights.lycoris and result.energy_kept == pytest.approx(1.0)
    for name, delta in expected.items():
        torch.testing.assert_close(result.weights.modules[name].delta(), delta.reshape(shapes[name]), atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError, match="needs --rank"):
        merge_weights(adapters, [1.0, 0.5], "svd")

    # The merge verb writes a file that reads back to the same updates; fuse adds them to the base weights.
    outcome = merge(MergeConfig(adapters=[str(lokr_path), f"{loha_path}:0.5"], out=str(tmp_path / "merged")))
    back = read_lora(outcome.folder)
    assert "LoKr/LoHa modules" in outcome.summary and sorted(back.lycoris) == sorted(expected)
    transformer = load_transformer(tiny_model)
    before = {name: transformer.get_submodule(name).weight.detach().clone() for name in expected}
    fuse_into(transformer, [back], [1.0])
    assert not lora.lora_layers(transformer)
    for name, delta in expected.items():
        torch.testing.assert_close(transformer.get_submodule(name).weight - before[name], delta.reshape(shapes[name]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["comfyui", "diffusers"])
def test_exports_are_what_comfyui_core_applies_and_plain_lora_formats_refuse(fmt, written, tiny_model, tmp_path):
    path, _, updates = written["loha"]
    weights = read_lora(path)
    state = load_file(str(export_file(weights, fmt, tmp_path / f"{fmt}.safetensors")))
    model = load_transformer(tiny_model)
    collected = original_zeros(model)
    assert comfy_apply(state, comfy_key_map(model), collected) == set(state)
    shapes = layer_shapes(model)
    for name, (target, start, rows) in comfy_key_map(model).items():
        if name.startswith("transformer."):
            got = collected[target] if rows < 0 else collected[target][start : start + rows]
            torch.testing.assert_close(got.reshape(shapes[name[12:]]), updates[name[12:]].reshape(shapes[name[12:]]), atol=1e-6, rtol=1e-6)
    for plain in ("onetrainer", "pixart"):
        with pytest.raises(UserError, match=f"the {plain} format holds plain LoRA only.*--format comfyui.*--method svd"):
            export_file(weights, plain, tmp_path / f"{plain}.safetensors")


def test_training_a_lokr_saves_an_adapter_that_reads_back_and_resumes(tiny_model, red_dataset, tmp_path, monkeypatch):  # noqa: F811
    from pixart_tune.training.outputs import COMFYUI_FILE
    from pixart_tune.training.trainer import run
    from tests.training_fixtures import assert_same_adapter, interrupt_then_resume

    settings = ("lora.type=lokr", "lora.rank=4", "lora.alpha=8", "schedule.steps=4", "checkpoint.every=2")
    adapter = run(tiny_config(tiny_model, red_dataset, tmp_path / "one", *settings), progress=False)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LOKR"
    weights = read_lora(adapter)
    assert not weights.modules and weights.lycoris and {type(m).__name__ for m in weights.lycoris.values()} == {"LokrModule"}
    transformer = load_transformer(tiny_model).eval()
    base = output(transformer)
    apply_lora(transformer, weights, "trained")
    changed = output(transformer)
    assert (changed - base).abs().max() > 1e-4
    # ComfyUI core's file beside the folder holds the same updates.
    comfy = read_lora(adapter.parent / COMFYUI_FILE)
    for name, module in weights.lycoris.items():
        torch.testing.assert_close(comfy.lycoris[name].delta(), module.delta(), atol=1e-6, rtol=1e-6)
    # Crashed at step 3 and resumed from the step-2 checkpoint: the same adapter, bit for bit.
    resumed = interrupt_then_resume(tiny_config(tiny_model, red_dataset, tmp_path / "two", *settings), monkeypatch, at_step=3)
    assert_same_adapter(adapter, resumed)
    # A LoRA recipe refuses the LoKr as init_adapter, saying what differs.
    from pixart_tune.training.trainer import Trainer

    with pytest.raises(UserError, match="type=lokr \\(recipe: lora\\)"):
        Trainer(tiny_config(tiny_model, red_dataset, tmp_path / "three", f"init_adapter={adapter}"), progress=False).setup()
    stage2 = Trainer(tiny_config(tiny_model, red_dataset, tmp_path / "four", f"init_adapter={adapter}", *settings[:3]), progress=False)
    stage2.setup()
    with torch.no_grad():
        stage2.transformer.eval()
        assert_close(output(stage2.transformer), changed, tol=1e-6)
    stage2.cleanup()
