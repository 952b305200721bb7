"""LoKr and LoHa: files written by the lycoris-lora package read into the updates its training applied,
injected through PEFT with the same effect, and exported so that ComfyUI core's math gives them back.

Every reference value comes from LyCORIS' own modules (``tests/lycoris_fixtures.py``),
PEFT's own layers, or a re-implementation of ComfyUI's loader cited there.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json

import pytest
import torch
from peft import LoHaConfig, LoKrConfig
from peft.functional import get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.lycoris_utils import LycorisLayer

from pixart_tune.adapters import lycoris as ly
from pixart_tune.adapters.layouts import pixart_module_names, underscored
from pixart_tune.errors import UserError
from tests.adapter_fixtures import assert_close, output
from tests.lycoris_fixtures import (
    OriginalBlocks,
    comfy_apply,
    comfy_key_map,
    layer_shapes,
    lycoris_network,
    original_zeros,
    saved_state,
    tiny_transformer,
    trained_updates,
)

pytest.importorskip("lycoris")

# create_lycoris settings, each a case the format has (tiny model: width 32, patch conv 4 -> 32, kernel 2).
CASES = {
    # factor -1: Linear 32x32 -> w1 (4, 4) full, w2 (8, 8) as w2_a @ w2_b; the conv's w2 in Tucker form (lokr_t2).
    "lokr": dict(algo="lokr", linear_dim=2, linear_alpha=6, conv_dim=1, conv_alpha=3, use_tucker=True),
    # decompose_both and an explicit factor: w1_a/w1_b and w2_a/w2_b; the conv's w2_b flattened (rank, in2 * kh * kw).
    "lokr-both-factor4": dict(algo="lokr", linear_dim=1, linear_alpha=3, decompose_both=True, factor=4, conv_dim=1, conv_alpha=2),
    # a rank too large to decompose either half: both full, scale 1 whatever alpha says.
    "lokr-full": dict(algo="lokr", linear_dim=16, linear_alpha=3, conv_dim=16, conv_alpha=5),
    "loha": dict(algo="loha", linear_dim=2, linear_alpha=5, conv_dim=2, conv_alpha=1, use_tucker=True),
    "loha-flat-conv": dict(algo="loha", linear_dim=3, linear_alpha=1.5, conv_dim=2, conv_alpha=4),
}


@pytest.fixture(scope="module")
def base():
    return tiny_transformer()


def _written(base, case: str, tmp_path, seed: int = 1):
    """(LyCORIS-applied model, its file's state dict, updates its forward adds by diffusers name)."""
    model = copy.deepcopy(base)
    network = lycoris_network(model, seed, **CASES[case])
    state = saved_state(network, tmp_path / f"{case}.safetensors")
    by_lyco_name = trained_updates(network)
    names = {f"lycoris_{underscored(n)}": n for n in layer_shapes(base)}
    return model, state, {names[k]: v for k, v in by_lyco_name.items()}


def _assert_deltas(modules, updates, tol: float = 1e-6) -> None:
    assert sorted(modules) == sorted(updates)
    for name, update in updates.items():
        torch.testing.assert_close(modules[name].delta(), update, atol=tol, rtol=tol, msg=name)


@pytest.mark.parametrize("case", list(CASES))
def test_lycoris_files_read_as_lycoris_trained_them_and_apply_through_peft(case, base, tmp_path):
    applied, state, updates = _written(base, case, tmp_path)
    shapes = layer_shapes(base)
    modules = ly.read_lycoris(state, shapes, shapes)
    _assert_deltas(modules, updates)
    conv = modules["pos_embed.proj"]
    assert conv.delta().shape == (32, 4, 2, 2)
    if case == "lokr":
        assert conv.t2 is not None and modules["proj_out"].w1 is not None and modules["proj_out"].scale == 3.0
    if case == "lokr-both-factor4":
        assert modules["proj_out"].w1_a is not None and modules["proj_out"].w2_a is not None
        assert conv.t2 is None and conv.w2_b.ndim == 2
    if case == "lokr-full":
        # LyCORIS stores its lora_dim as alpha then, and applies scale 1.
        assert modules["proj_out"].rank is None and modules["proj_out"].scale == 1.0 and modules["proj_out"].alpha == 16.0
    if case == "loha":
        assert conv.t1 is not None and modules["proj_out"].scale == 2.5

    # PEFT's layers add the same updates, and the transformer gives LyCORIS' output.
    target = copy.deepcopy(base)
    ly.inject(target, modules, "lyco")
    layers = {n: m for n, m in target.named_modules() if isinstance(m, LycorisLayer)}
    assert sorted(layers) == sorted(modules)
    for name, layer in layers.items():
        torch.testing.assert_close(layer.get_delta_weight("lyco"), updates[name], atol=1e-6, rtol=1e-6, msg=name)
    assert not any(p.requires_grad for n, p in target.named_parameters() if ".lyco" in n)
    assert_close(output(target), output(applied), output(base), tol=1e-5)


def test_lycoris_merges_apply_the_scale_twice_where_its_forward_applies_it_once(base, tmp_path):
    """lycoris-lora's get_diff_weight (used by its merge_to) multiplies get_weight, already scaled, by the scale again."""
    if importlib.metadata.version("lycoris-lora") != "4.1.3":
        pytest.skip("checked against lycoris-lora 4.1.3, the version the module docstring describes")
    network = lycoris_network(copy.deepcopy(base), 1, **CASES["lokr"])
    for module in network.loras:
        forward = module.get_weight(module.shape) * module.scalar
        merged = module.get_diff_weight(shape=module.shape)[0]
        torch.testing.assert_close(merged, forward * module.scale)


def test_original_names_split_fused_layers_exactly(base, tmp_path):
    names = pixart_module_names(1)
    for case, exact in (("lokr", ("cross_attn.kv_linear",)), ("loha", ("attn.qkv", "cross_attn.kv_linear"))):
        original = OriginalBlocks(layers=1)
        network = lycoris_network(original, 2, prefix="lora_unet", **{k: v for k, v in CASES[case].items() if "conv" not in k})
        state = saved_state(network, tmp_path / f"{case}-original.safetensors")
        updates = trained_updates(network)
        assert "lora_unet_blocks_0_attn_qkv.alpha" in state
        comfy_style = {k.replace("lora_unet_blocks_0_", "diffusion_model.blocks.0.").replace("attn_qkv", "attn.qkv")
                       .replace("cross_attn_", "cross_attn.").replace("attn_proj", "attn.proj").replace("mlp_", "mlp."): v
                       for k, v in state.items()}
        for variant in (state, comfy_style):
            modules = ly.read_lycoris(variant, names)
            assert len(modules) == 10
            for fused, parts in (("attn_qkv", ("attn1.to_q", "attn1.to_k", "attn1.to_v")), ("cross_attn_kv_linear", ("attn2.to_k", "attn2.to_v"))):
                stacked = torch.cat([modules[f"transformer_blocks.0.{p}"].delta() for p in parts])
                torch.testing.assert_close(stacked, updates[f"lora_unet_blocks_0_{fused}"], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(modules["transformer_blocks.0.ff.net.0.proj"].delta(), updates["lora_unet_blocks_0_mlp_fc1"])
        # A LoKr whose W1 rows divide by the parts stays a LoKr of the same rank; a 96-row qkv (W1 of 8 rows) becomes full updates.
        assert isinstance(modules["transformer_blocks.0.attn2.to_k"], type(modules["transformer_blocks.0.ff.net.2"]))
        assert modules["transformer_blocks.0.attn2.to_k"].rank == modules["transformer_blocks.0.ff.net.2"].rank
        if case == "lokr":
            assert modules["transformer_blocks.0.attn1.to_q"].rank is None and modules["transformer_blocks.0.attn1.to_q"].w1.shape == (1, 1)
        # Exported with original names, parts split from one module stack back into it exactly.
        written = ly.to_comfyui_state(modules, "comfyui")
        for fused in exact:
            key = f"diffusion_model.blocks.0.{fused}"
            for tensor in [k for k in state if k.startswith(f"lora_unet_blocks_0_{underscored(fused)}.")]:
                assert torch.equal(written[f"{key}.{tensor.rsplit('.', 1)[1]}"], state[tensor]), tensor
        # PEFT takes them all, full updates and LoKr parts in separate groups of one adapter.
        target = tiny_transformer(layers=1)
        ly.inject(target, modules, "fused")
        for name, layer in ((n, m) for n, m in target.named_modules() if isinstance(m, LycorisLayer)):
            torch.testing.assert_close(layer.get_delta_weight("fused"), modules[name].delta(), atol=1e-6, rtol=1e-6)


def test_every_naming_reads_to_the_same_updates(base, tmp_path):
    _, state, updates = _written(base, "lokr", tmp_path)
    shapes = layer_shapes(base)
    dotted = {f"lycoris_{underscored(n)}": n for n in shapes}

    def renamed(form: str) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in state.items():
            module, tensor = key.rsplit(".", 1)
            out[f"{form.format(dotted=dotted[module], underscored=underscored(dotted[module]))}.{tensor}"] = value
        return out

    forms = ("transformer.{dotted}", "{dotted}", "base_model.model.{dotted}", "unet.base_model.model.{dotted}",
             "lora_unet_{underscored}", "lora_transformer_{underscored}")
    for form in forms:
        _assert_deltas(ly.read_lycoris(renamed(form), shapes, shapes), updates)
    # A plain LoRA beside them is left to the LoRA reader.
    mixed = {**state, "lora_unet_blocks_0_attn_qkv.lora_down.weight": torch.zeros(2, 32), "lora_unet_blocks_0_attn_qkv.alpha": torch.tensor(2.0)}
    assert ly.lycoris_keys(mixed) == set(state)


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_peft_folders_read_at_peft_scale(kind, base):
    """PEFT scales by alpha / r per module (rank_pattern / alpha_pattern), also a LoKr with both halves full."""
    targets = ["transformer_blocks.0.attn1.to_q", "transformer_blocks.1.ff.net.2", "pos_embed.proj", "proj_out"]
    settings = dict(r=2, alpha=5, target_modules=targets, rank_pattern={"proj_out": 16}, alpha_pattern={"ff.net.2": 1.5}, init_weights=False)
    config = LoKrConfig(**settings, use_effective_conv2d=True) if kind == "lokr" else LoHaConfig(**settings)
    model = inject_adapter_in_model(config, copy.deepcopy(base), adapter_name="default")
    # What PeftModel.save_pretrained writes: get_peft_model_state_dict under base_model.model., and the config as JSON.
    state = {f"base_model.model.{k}": v for k, v in get_peft_model_state_dict(model).items()}
    written = json.loads(json.dumps(config.to_dict(), default=sorted))
    modules = ly.read_peft_lycoris(state, written, layer_shapes(base))
    if kind == "lokr":
        assert modules["proj_out"].rank is None  # r 16 keeps both halves full; PEFT still scales by 5 / 16
    shapes = layer_shapes(base)
    for name, layer in ((n, m) for n, m in model.named_modules() if isinstance(m, LycorisLayer)):
        module = ly.fit_shapes({name: modules[name]}, base)[name]
        torch.testing.assert_close(module.delta(), layer.get_delta_weight("default"), atol=1e-6, rtol=1e-6, msg=name)
        assert module.shape == shapes[name]


@pytest.mark.parametrize("case", ["lokr", "lokr-both-factor4", "lokr-full", "loha", "loha-flat-conv"])
@pytest.mark.parametrize("layout", ["diffusers", "comfyui"])
def test_comfyui_core_applies_the_exports_as_read(case, layout, base, tmp_path):
    _, state, _ = _written(base, case, tmp_path)
    shapes = layer_shapes(base)
    modules = ly.read_lycoris(state, shapes, shapes)
    exported = ly.to_comfyui_state(modules, layout)
    weights = original_zeros(base)
    used = comfy_apply(exported, comfy_key_map(base), weights)
    assert used == set(exported), sorted(set(exported) - used)[:3]  # ComfyUI would log "lora key not loaded" for the rest
    for name, (target, start, rows) in comfy_key_map(base).items():
        if name.startswith("transformer."):
            got = weights[target] if rows < 0 else weights[target][start : start + rows]
            torch.testing.assert_close(got.reshape(shapes[name[12:]]), modules[name[12:]].delta(), atol=1e-6, rtol=1e-6, msg=name)


def test_lycoris_reads_its_own_naming_back(base, tmp_path):
    """The ``lycoris`` export loads with LyCORIS' create_lycoris_from_weights (linear layers; it misreads a Tucker rank)."""
    from lycoris import create_lycoris_from_weights

    applied, state, _ = _written(base, "lokr-both-factor4", tmp_path)
    modules = ly.read_lycoris(state, layer_shapes(base), layer_shapes(base))
    linear = {n: m for n, m in modules.items() if n != "pos_embed.proj"}
    applied_linear = copy.deepcopy(base)
    ly.inject(applied_linear, linear, "ours")
    target = copy.deepcopy(base)
    network, _ = create_lycoris_from_weights(1.0, "", target, weights_sd=ly.to_comfyui_state(linear, "lycoris"))
    network.apply_to()
    assert len(network.loras) == len(linear)
    assert_close(output(target), output(applied_linear), output(base), tol=1e-5)


def _lokr(name: str, **tensors) -> dict[str, torch.Tensor]:
    return {f"{name}.lokr_{k}": v for k, v in tensors.items()}


Q = "lycoris_transformer_blocks_0_attn1_to_q"
FAULTS = {
    "w1 without w2": (_lokr(Q, w1=torch.ones(4, 4)), "needs lokr_w2 or lokr_w2_a"),
    "w1_a without w1_b": (_lokr(Q, w1_a=torch.ones(4, 2), w2=torch.ones(8, 8)), "only one of lokr_w1_a"),
    "factors that do not multiply": (_lokr(Q, w1=torch.ones(4, 4), w2_a=torch.ones(8, 2), w2_b=torch.ones(3, 8)), "do not fit together"),
    "halves of different ranks": (_lokr(Q, w1_a=torch.ones(4, 2), w1_b=torch.ones(2, 4), w2_a=torch.ones(8, 3), w2_b=torch.ones(3, 8)), "different ranks"),
    "update of the wrong shape": (_lokr(Q, w1=torch.ones(4, 4), w2_a=torch.ones(8, 2), w2_b=torch.ones(2, 4)), "does not fit this model"),
    "LoHa without hada_w2_b": ({f"{Q}.hada_{k}": torch.ones(2, 32) if k.endswith("b") else torch.ones(32, 2) for k in ("w1_a", "w1_b", "w2_a")}, "lacks hada_w2_b"),
    "hada_t1 without hada_t2": ({**{f"{Q}.hada_{k}": torch.ones(2, 32) for k in ("w1_a", "w1_b", "w2_a", "w2_b")}, f"{Q}.hada_t1": torch.ones(2, 2, 1, 1)}, "only one of hada_t1"),
    "LoKr and LoHa mixed": ({**_lokr(Q, w1=torch.ones(4, 4), w2=torch.ones(8, 8)), f"{Q}.hada_w1_a": torch.ones(32, 2)}, "mixes LoKr"),
    "DoRA": ({**_lokr(Q, w1=torch.ones(4, 4), w2=torch.ones(8, 8)), f"{Q}.dora_scale": torch.ones(32, 1)}, "dora_scale"),
    "another model": (_lokr("lycoris_down_blocks_0_attentions_0_proj_in", w1=torch.ones(4, 4), w2=torch.ones(8, 8)), "matches no PixArt-Sigma layer"),
    "fused rows that do not split": (_lokr("lora_unet_blocks_0_attn_qkv", w1=torch.ones(4, 4), w2=torch.ones(8, 8)), "cannot split into 3 parts"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_malformed_lycoris_files_are_refused_naming_the_module(fault, base):
    state, message = FAULTS[fault]
    shapes = layer_shapes(base)
    with pytest.raises(UserError, match=message) as caught:
        ly.read_lycoris(state, shapes, shapes)
    text = str(caught.value)
    assert "\n" not in text and ("lycoris_" in text or "lora_unet_" in text), text


def test_svd_turns_an_update_into_a_plain_lora(base, tmp_path):
    _, state, _ = _written(base, "lokr", tmp_path)
    modules = ly.read_lycoris(state, layer_shapes(base), layer_shapes(base))
    for name in ("transformer_blocks.0.ff.net.0.proj", "pos_embed.proj"):
        delta = modules[name].delta()
        exact, kept, total = ly.lora_from_delta(delta, 64)
        torch.testing.assert_close(exact.delta(), delta, atol=1e-5, rtol=1e-5)
        assert exact.delta().shape == delta.shape and kept == pytest.approx(total)
        low, kept, total = ly.lora_from_delta(delta, 2)
        singular = torch.linalg.svdvals(delta.double().reshape(delta.shape[0], -1))
        assert low.rank == 2 and kept == pytest.approx(float((singular[:2] ** 2).sum())) and kept < total
