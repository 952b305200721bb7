"""Every LoRA layout people produce for PixArt-Sigma loads and gives the toolkit adapter's outputs.

Files are written here by hand from the adapter's known PEFT weights (not by the
exporters under test), then read back through the loader.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from pixart_tune.adapters import lora
from pixart_tune.adapters.layouts import detect_layout
from pixart_tune.adapters.loader import AdapterSpec, apply_lora, load_adapters, load_into, read_lora
from pixart_tune.errors import UserError
from pixart_tune.models import load_transformer
from pixart_tune.tiny import tiny_transformer_config
from tests.adapter_fixtures import adapters, assert_close, filled_transformer, output, peft_load, peft_state  # noqa: F401  (adapters: a fixture)

RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def reference(tiny_model, adapters):  # noqa: F811
    """(PEFT state dict of adapter a, its output, the base output)."""
    state = peft_state(adapters["a"])
    transformer = load_transformer(tiny_model)
    base = output(transformer)
    peft_load(transformer, adapters["a"])
    return state, output(transformer), base


def _module(key: str) -> str:
    return key.rsplit(".lora_", 1)[0]


def _prefixed(state, prefix: str, down: str = "lora_A", up: str = "lora_B", with_alpha: bool = True):
    out = {}
    for key, tensor in state.items():
        name = _module(key)
        kind = down if ".lora_A." in key else up
        out[f"{prefix}{name}.{kind}.weight"] = tensor
        if with_alpha:
            out[f"{prefix}{name}.alpha"] = torch.tensor(ALPHA)
    return out


def _onetrainer(state):
    return {
        f"lora_transformer_{_module(k).replace('.', '_')}.{'lora_down' if '.lora_A.' in k else 'lora_up'}.weight": v
        for k, v in state.items()
    } | {f"lora_transformer_{_module(k).replace('.', '_')}.alpha": torch.tensor(ALPHA) for k in state}


LAYOUTS = {
    "diffusers": (lambda s: _prefixed(s, "transformer."), "diffusers"),
    "peft-model": (lambda s: _prefixed(s, "base_model.model."), "peft-model"),
    "peft-unet": (lambda s: _prefixed(s, "unet.base_model.model."), "peft-unet"),
    "bare-peft": (lambda s: _prefixed(s, ""), "peft"),
    "diffusers-down-up": (lambda s: _prefixed(s, "transformer.", "lora_down", "lora_up"), "diffusers"),
    "onetrainer": (_onetrainer, "onetrainer"),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_each_layout_gives_the_adapters_outputs(name, tiny_model, reference, tmp_path):
    state, expected, base = reference
    write, layout = LAYOUTS[name]
    path = tmp_path / f"{name}.safetensors"
    save_file(write(state), str(path))
    weights = read_lora(path)
    assert weights.layout == layout
    transformer = load_transformer(tiny_model)
    load_adapters(transformer, [AdapterSpec(str(path))])
    assert_close(output(transformer), expected, base)


def test_peft_file_without_alpha_takes_it_from_a_sidecar_json(tiny_model, reference, tmp_path):
    state, expected, base = reference
    path = tmp_path / "lora.safetensors"
    save_file(_prefixed(state, "transformer.", with_alpha=False), str(path))
    # Without alpha, ComfyUI's rule: alpha = rank (scale 1), which is not this adapter.
    transformer = load_transformer(tiny_model)
    load_adapters(transformer, [AdapterSpec(str(path))])
    assert (output(transformer) - expected).abs().max() > 1e-3
    (tmp_path / "lora.json").write_text(json.dumps({"lora_alpha": ALPHA}))
    transformer = load_transformer(tiny_model)
    load_adapters(transformer, [AdapterSpec(str(path))])
    assert_close(output(transformer), expected, base)


def _underscore_module(key: str) -> str:
    module, suffix = (key[: -len(".alpha")], ".alpha") if key.endswith(".alpha") else key.split(".lora_", 1)
    return module.replace(".", "_") + (suffix if suffix == ".alpha" else f".lora_{suffix}")


def test_a_genuinely_fused_qkv_lora_applies_to_the_split_layers(tiny_model, tmp_path):
    """A LoRA trained on the original model's fused qkv (shared A) equals editing q, k, v by hand."""
    generator = torch.Generator().manual_seed(5)
    transformer = load_transformer(tiny_model)
    base = output(transformer)
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    state, rank, alpha = {}, 3, 6.0
    for block in range(transformer.config.num_layers):
        for name, parts in ((f"blocks.{block}.attn.qkv", 3), (f"blocks.{block}.cross_attn.kv_linear", 2)):
            state[f"{name}.lora_down.weight"] = torch.randn(rank, width, generator=generator) * 0.3
            state[f"{name}.lora_up.weight"] = torch.randn(parts * width, rank, generator=generator) * 0.3
            state[f"{name}.alpha"] = torch.tensor(alpha)
    path = tmp_path / "fused.safetensors"
    save_file(state, str(path))
    assert read_lora(path).layout == "pixart"

    expected_model = load_transformer(tiny_model)
    with torch.no_grad():
        for block in range(expected_model.config.num_layers):
            for name, parts in ((f"blocks.{block}.attn.qkv", "qkv"), (f"blocks.{block}.cross_attn.kv_linear", "kv")):
                delta = alpha / rank * state[f"{name}.lora_up.weight"] @ state[f"{name}.lora_down.weight"]
                attn = "attn1" if "qkv" in name else "attn2"
                for part, rows in zip(parts, delta.chunk(len(parts))):
                    expected_model.get_submodule(f"transformer_blocks.{block}.{attn}.to_{part}").weight += rows
    expected = output(expected_model)

    load_adapters(transformer, [AdapterSpec(str(path))])
    assert_close(output(transformer), expected, base)
    # With ComfyUI's prefix and with kohya-style underscored original names too.
    comfy = {f"diffusion_model.{k}": v for k, v in state.items()}
    kohya = {"lora_unet_" + _underscore_module(k): v for k, v in state.items()}
    for variant, layout in ((comfy, "comfyui"), (kohya, "kohya-original")):
        file = tmp_path / f"{layout}.safetensors"
        save_file(variant, str(file))
        assert read_lora(file).layout == layout
        model = load_transformer(tiny_model)
        load_adapters(model, [AdapterSpec(str(file))])
        assert_close(output(model), expected, base)


def test_several_adapters_at_once_with_their_own_scales(tiny_model, adapters):  # noqa: F811
    together = load_transformer(tiny_model)
    load_adapters(together, [AdapterSpec(str(adapters["a"]), 0.5), AdapterSpec(str(adapters["c"]), -1.5)])
    # The same through PEFT's own path, one adapter after the other.
    expected = load_transformer(tiny_model)
    peft_load(expected, adapters["a"], "x", scale=0.5)
    peft_load(expected, adapters["c"], "y", scale=-1.5)
    lora.activate(expected, ["x", "y"])
    assert_close(output(together), output(expected), output(load_transformer(tiny_model)))


# --- refusals ----------------------------------------------------------------------------


def test_a_lora_for_another_width_is_refused_naming_the_shapes(tiny_model, tmp_path):
    from diffusers import PixArtTransformer2DModel

    other = PixArtTransformer2DModel.from_config(tiny_transformer_config(head_dim=24))
    settings = lora.LoraSettings(rank=2, alpha=2)
    lora.inject_lora(other, settings)
    path = lora.save_adapter(other, tmp_path / "wide", settings)
    transformer = load_transformer(tiny_model)
    with pytest.raises(UserError, match=r"maps 48 -> 48 features but this model's layer maps 32 -> 32.*different base"):
        load_adapters(transformer, [AdapterSpec(str(path))])
    # The trainer's path (init_adapter, resume) into an injected adapter refuses it too.
    lora.inject_lora(transformer, settings)
    with pytest.raises(UserError, match=r"maps 48 -> 48 features but this model's layer maps 32 -> 32.*different base"):
        load_into(transformer, read_lora(path))


def test_a_lora_for_a_deeper_model_is_refused_naming_the_missing_layer(tiny_model, reference, tmp_path):
    state, _, _ = reference
    deeper = {k.replace("transformer_blocks.1.", "transformer_blocks.27."): v for k, v in state.items()}
    path = tmp_path / "deep.safetensors"
    save_file(_prefixed(deeper, "transformer."), str(path))
    with pytest.raises(UserError, match=r"no layer in this model \(e\.g\. transformer_blocks\.27\..*2 transformer blocks"):
        apply_lora(load_transformer(tiny_model), read_lora(path), "x")


@pytest.mark.parametrize(
    ("key", "family"),
    [
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "SDXL"),
        ("unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", "SDXL"),
        ("transformer.single_transformer_blocks.0.attn.to_q", "FLUX"),
        ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "text encoder"),
    ],
)
def test_a_lora_for_another_family_is_refused_naming_it(key, family, tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({f"{key}.lora_down.weight": torch.zeros(2, 8), f"{key}.lora_up.weight": torch.zeros(8, 2)}, str(path))
    with pytest.raises(UserError, match=family):
        read_lora(path)


def test_files_that_are_not_pixart_loras_are_refused(tmp_path):
    with pytest.raises(UserError, match="LoHa"):
        detect_layout(["transformer.transformer_blocks.0.attn1.to_q.hada_w1_a"])
    with pytest.raises(UserError, match="no LoRA weights"):
        detect_layout([])
    with pytest.raises(UserError, match="unrecognised LoRA key layout"):
        detect_layout(["model.layers.0.q.lora_A.weight"])
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a readable safetensors"):
        read_lora(bad)


def test_pickle_files_are_refused_unless_explicitly_allowed(tiny_model, reference, tmp_path):
    state, expected, base = reference
    path = tmp_path / "lora.bin"
    torch.save(_prefixed(state, "transformer."), path)
    with pytest.raises(UserError, match="pickle.*run any code.*--allow-pickle-runs-code"):
        read_lora(path)
    transformer = load_transformer(tiny_model)
    load_adapters(transformer, [AdapterSpec(str(path))], allow_pickle=True)
    assert_close(output(transformer), expected, base)


@pytest.mark.parametrize("variant", [{"rslora": True}, {"dora": True}])
def test_rslora_and_dora_folders_load_like_peft_loads_them(variant, tiny_model, tmp_path):
    settings = lora.LoraSettings(rank=4, alpha=3.0, **variant)
    trained = filled_transformer(tiny_model, settings, seed=9)
    path = lora.save_adapter(trained, tmp_path / "adapter", settings)
    transformer = load_transformer(tiny_model)
    load_adapters(transformer, [AdapterSpec(str(path), 0.6)])
    expected = peft_load(load_transformer(tiny_model), path, scale=0.6)
    assert_close(output(transformer), output(expected), output(load_transformer(tiny_model)))


def test_adapters_load_in_fp32_onto_a_bf16_model(tiny_model, adapters):  # noqa: F811
    """PEFT makes LoRA layers in the base dtype; the weights must reach them unrounded."""
    weights = read_lora(adapters["a"])
    name, module = next(iter(weights.modules.items()))
    for load in (lambda t: apply_lora(t, weights, "default"), lambda t: load_into(lora.inject_lora(t, lora.LoraSettings(rank=4, alpha=8.0, targets="attention_ff")), weights)):
        transformer = load_transformer(tiny_model, dtype=torch.bfloat16)
        load(transformer)
        down = transformer.get_submodule(name).lora_A["default"].weight
        assert down.dtype == torch.float32
        assert torch.equal(down, module.down.float())


@pytest.mark.parametrize(
    "config",
    [dict(use_rslora=True), dict(alpha_pattern={"attn2.to_q": 16.0}, rank_pattern={"attn1.to_v": 2})],
    ids=["rslora", "patterns"],
)
def test_a_folder_peft_itself_saved_loads_at_peft_strength(config, tiny_model, tmp_path):
    """PEFT's save_pretrained writes base_model.model. keys; rsLoRA and per-module patterns must still apply."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_transformer(tiny_model), LoraConfig(r=4, lora_alpha=8.0, target_modules=["to_q", "to_k", "to_v"], **config))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    model.save_pretrained(tmp_path / "peft")
    expected = output(model.base_model.model.eval())
    base = output(load_transformer(tiny_model))
    for path in (tmp_path / "peft", tmp_path / "peft" / "adapter_model.safetensors"):  # the folder, or its weights file
        transformer = load_transformer(tiny_model)
        load_adapters(transformer, [AdapterSpec(str(path))])
        assert_close(output(transformer), expected, base)


def test_a_onetrainer_file_that_also_trained_t5_applies_its_transformer_part(tiny_model, reference, tmp_path, caplog):
    state, expected, base = reference
    text_encoder = "lora_te_encoder_block_0_layer_0_SelfAttention_q"
    path = tmp_path / "with_te.safetensors"
    save_file(_onetrainer(state) | {f"{text_encoder}.lora_down.weight": torch.zeros(2, 32), f"{text_encoder}.lora_up.weight": torch.zeros(32, 2),
                                    f"{text_encoder}.alpha": torch.tensor(2.0)}, str(path))
    transformer = load_transformer(tiny_model)
    with caplog.at_level("WARNING"):
        load_adapters(transformer, [AdapterSpec(str(path))])
    assert_close(output(transformer), expected, base)
    assert "the text-encoder (T5) part of this LoRA is not applied" in caplog.text
