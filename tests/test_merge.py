"""Merging, SVD resizing and fusing, checked against the unmerged adapters' outputs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pixart_tune.adapters.layouts import LoraModule, LoraWeights
from pixart_tune.adapters.loader import AdapterSpec, load_adapters, read_lora
from pixart_tune.adapters.merge import (
    fuse_adapters,
    merge_adapters,
    merge_cat,
    merge_linear,
    merge_svd,
    public_name,
    resize_adapter,
    truncated_svd,
)
from pixart_tune.commands.merge import main as cli
from pixart_tune.errors import UserError
from pixart_tune.models import load_transformer
from tests.adapter_fixtures import adapters, assert_close, output, peft_load, peft_state  # noqa: F401  (adapters: a fixture)

WEIGHTS = (0.7, -0.4)


def _unmerged(model: str, specs: list[AdapterSpec]) -> torch.Tensor:
    transformer = load_transformer(model)
    load_adapters(transformer, specs)
    return output(transformer)


def _merged(model: str, folder) -> torch.Tensor:
    transformer = load_transformer(model)
    peft_load(transformer, folder)  # PEFT's own path: the merged folder is a normal adapter
    return output(transformer)


def _random_module(rank: int, seed: int, out: int = 12, inp: int = 10) -> LoraModule:
    generator = torch.Generator().manual_seed(seed)
    return LoraModule(torch.randn(rank, inp, generator=generator), torch.randn(out, rank, generator=generator), float(rank + seed))


# --- pure math ----------------------------------------------------------------------------


def test_cat_is_exact_and_svd_matches_an_independent_truncated_svd():
    modules = [_random_module(3, 1), _random_module(2, 2)]
    exact = sum(w * m.delta() for m, w in zip(modules, WEIGHTS))
    assert torch.allclose(merge_cat(modules, WEIGHTS).delta(), exact, atol=1e-5)
    full, kept, total = merge_svd(modules, WEIGHTS, rank=5)
    assert torch.allclose(full.delta(), exact, atol=1e-4) and kept == pytest.approx(total)
    low, kept, total = merge_svd(modules, WEIGHTS, rank=2)
    u, s, vh = torch.linalg.svd(exact.double())
    expected = (u[:, :2] * s[:2]) @ vh[:2]
    assert low.rank == 2
    assert torch.allclose(low.delta().double(), expected, atol=1e-4)
    assert kept / total == pytest.approx(float((s[:2] ** 2).sum() / (s**2).sum()), rel=1e-6)


def test_linear_equals_peft_add_weighted_adapter(tiny_model, adapters):  # noqa: F811
    """Our pure linear merge against PEFT's own LoraModel.add_weighted_adapter on the real model."""
    from peft import LoraConfig, LoraModel

    a_state, b_state = peft_state(adapters["a"]), peft_state(adapters["b"])
    transformer = load_transformer(tiny_model)
    model = LoraModel(transformer, LoraConfig.from_pretrained(str(adapters["a"])), "a")
    model.peft_config["b"] = LoraConfig.from_pretrained(str(adapters["b"]))
    model.inject_adapter(model.model, "b")
    from peft.utils import set_peft_model_state_dict

    set_peft_model_state_dict(model.model, a_state, adapter_name="a")
    set_peft_model_state_dict(model.model, b_state, adapter_name="b")
    model.add_weighted_adapter(["a", "b"], list(WEIGHTS), "m", combination_type="linear")
    a, b = read_lora(adapters["a"]), read_lora(adapters["b"])
    name = "transformer_blocks.1.attn2.to_v"
    ours = merge_linear([a.modules[name], b.modules[name]], WEIGHTS)
    layer = model.model.get_submodule(name)
    assert torch.allclose(ours.down, layer.lora_A["m"].weight, atol=1e-6)
    assert torch.allclose(ours.up, layer.lora_B["m"].weight, atol=1e-6)
    assert ours.scale == pytest.approx(layer.scaling["m"])


def test_linear_refuses_mixed_ranks():
    with pytest.raises(UserError, match="same rank.*--method cat"):
        merge_linear([_random_module(3, 1), _random_module(2, 2)], WEIGHTS)


# --- on the tiny model -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_exact_merges_equal_the_unmerged_adapters(method, tiny_model, adapters, tmp_path):  # noqa: F811
    specs = [AdapterSpec(str(adapters["a"]), WEIGHTS[0]), AdapterSpec(str(adapters["c"]), WEIGHTS[1])]
    rank = 6 if method == "svd" else None  # 4 + 2: the sum's full rank, so SVD loses nothing
    folder = merge_adapters(specs, tmp_path / method, method=method, rank=rank)
    merged = read_lora(folder)
    assert merged.ranks == {6} and float(merged.metadata["energy_kept"]) == pytest.approx(1.0)
    # Inputs are recorded by name: a published file must not carry the machine's local paths.
    assert json.loads(merged.metadata["merged_from"])[1] == {"name": "c", "weight": WEIGHTS[1]}
    assert str(adapters["c"].parent) not in json.dumps(merged.metadata)
    assert_close(_merged(tiny_model, folder), _unmerged(tiny_model, specs), output(load_transformer(tiny_model)))


def test_linear_merge_of_one_adapter_is_that_adapter_scaled(tiny_model, adapters, tmp_path):  # noqa: F811
    folder = merge_adapters([AdapterSpec(str(adapters["b"]), -0.6)], tmp_path / "one", method="linear")
    assert_close(_merged(tiny_model, folder), _unmerged(tiny_model, [AdapterSpec(str(adapters["b"]), -0.6)]))


def test_svd_resize_keeps_the_reported_energy_and_the_best_low_rank_update(tiny_model, adapters, tmp_path):  # noqa: F811
    folder, energy = resize_adapter(adapters["a"], tmp_path / "r2", rank=2)
    original, resized = read_lora(adapters["a"]), read_lora(folder)
    assert resized.ranks == {2}
    kept = total = 0.0
    for name, module in original.modules.items():
        u, s, vh = torch.linalg.svd(module.delta().double())
        expected = (u[:, :2] * s[:2]) @ vh[:2]
        assert torch.allclose(resized.modules[name].delta().double(), expected, atol=1e-4), name
        kept += float((s[:2] ** 2).sum())
        total += float((s**2).sum())
    assert 0.0 < energy < 1.0 and energy == pytest.approx(kept / total, rel=1e-6)
    # Resizing to the adapter's own rank changes nothing.
    same, energy = resize_adapter(adapters["a"], tmp_path / "r4", rank=4)
    assert energy == pytest.approx(1.0)
    assert_close(_merged(tiny_model, same), _merged(tiny_model, adapters["a"]))


def test_fused_pipeline_loads_with_plain_diffusers_and_equals_the_adapters(tiny_model, adapters, tmp_path):  # noqa: F811
    from diffusers import PixArtSigmaPipeline

    specs = [AdapterSpec(str(adapters["a"]), 0.7), AdapterSpec(str(adapters["c"]), 1.3)]
    folder = fuse_adapters(tiny_model, specs, tmp_path / "fused")
    pipe = PixArtSigmaPipeline.from_pretrained(folder)
    assert not any("lora" in name for name, _ in pipe.transformer.named_parameters())
    assert_close(output(pipe.transformer), _unmerged(tiny_model, specs), output(load_transformer(tiny_model)))
    # Only the transformer is new; the base model's folder is untouched.
    assert (folder / "text_encoder").is_dir()
    # The record names the base model and adapters; it carries no path of this machine.
    record = json.loads((folder / "fused_adapters.json").read_text())
    assert record == {"base_model": "tiny", "adapters": [{"name": "a", "scale": 0.7}, {"name": "c", "scale": 1.3}]}
    assert not (tmp_path / "fused" / "transformer" / "adapter_config.json").exists()


def test_merge_verb_resizes_and_refuses_to_overwrite(tiny_model, adapters, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "small"
    assert cli([str(adapters["a"]), "--resize", "1", "--out", str(out)]) == 0
    assert "energy kept" in capsys.readouterr().out and read_lora(out).ranks == {1}
    assert read_lora(out).metadata["resized_from"] == "a"
    with pytest.raises(UserError, match="exists.*--overwrite"):
        cli([str(adapters["a"]), "--resize", "1", "--out", str(out)])
    with pytest.raises(UserError, match="one of the input adapters"):
        cli([str(adapters["a"]), f"{adapters['b']}:0.5", "--out", str(adapters["a"]), "--overwrite"])
    assert cli([str(adapters["a"]), f"{adapters['b']}:0.5", "--method", "cat", "--out", str(tmp_path / "m")]) == 0


def test_dora_adapters_refuse_low_rank_merging():
    weights = LoraWeights({"proj_out": _random_module(2, 1)}, dora_magnitudes={"proj_out": torch.ones(12)})
    with pytest.raises(UserError, match="DoRA.*--fuse"):
        weights.check_plain("merging")


def test_merged_files_name_their_inputs_without_local_paths(tmp_path):
    assert public_name("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS") == "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"
    assert public_name("/home/someone/loras/style.safetensors") == "style.safetensors"
    (tmp_path / "runs" / "owner").mkdir(parents=True)
    assert public_name(str(tmp_path / "runs" / "owner")) == "owner"
    assert public_name("./runs/style/") == "style"


def test_truncated_svd_handles_rank_above_the_matrix_rank():
    module = _random_module(3, 4)
    result, kept, total = truncated_svd(module.up * module.scale, module.down, rank=50)
    assert result.rank == 3 and kept == pytest.approx(total)
    assert torch.allclose(result.delta(), module.delta(), atol=1e-4)


def test_outputs_that_hold_their_inputs_are_refused(tiny_model, adapters, tmp_path):  # noqa: F811
    """Writing a folder replaces it whole: an output holding an input would delete the input."""
    runs = tmp_path / "runs"
    shutil.copytree(adapters["a"], runs / "a")
    with pytest.raises(UserError, match="holds one of the input adapters"):
        cli([str(runs / "a"), str(adapters["b"]), "--out", str(runs), "--overwrite"])
    with pytest.raises(UserError, match="holds one of the input adapters"):
        cli([str(runs / "a"), "--fuse", tiny_model, "--out", str(runs), "--overwrite"])
    with pytest.raises(UserError, match="inside the base model's folder"):
        cli([str(runs / "a"), "--fuse", tiny_model, "--out", f"{tiny_model}/transformer", "--overwrite"])
    assert read_lora(runs / "a").ranks == {4}
