"""diffusers' LoRA methods on PixArtSigmaPipeline: outputs against PEFT's own loading, diffusers' semantics, exact unfusing."""

from __future__ import annotations

import re
import shutil
import warnings

import pytest
import torch
from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline
from peft.functional import set_adapter
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file

from pixart_tune.adapters.layouts import LoraModule, LoraWeights, to_state_dict
from pixart_tune.adapters.loader import read_lora
from pixart_tune.adapters.pipeline_lora import (
    API,
    LoraApiError,
    PixArtSigmaLoraLoaderMixin,
    PixArtSigmaLoraPipeline,
    enable_lora,
    install,
)
from pixart_tune.errors import UserError
from pixart_tune.models import load_transformer
from tests.adapter_fixtures import adapters, assert_close, make_adapter, model_inputs, output, peft_load  # noqa: F401  (adapters: a fixture)
from tests.conftest import REPO

# The PEFT oracle loads several adapters into one model on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")


def pipeline(model: str, **kwargs) -> PixArtSigmaPipeline:
    pipe = PixArtSigmaPipeline.from_pretrained(model, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def oracle(model: str, loads: list[tuple[object, str, float]]) -> torch.Tensor:
    """The transformer's output with these (folder, name, scale) loaded and all active, by PEFT's code alone."""
    transformer = load_transformer(model)
    for folder, name, scale in loads:
        peft_load(transformer, folder, name, scale)
    set_adapter(transformer, [name for _, name, _ in loads])
    return output(transformer)


def base_weights(transformer) -> dict[str, torch.Tensor]:
    return {k.replace(".base_layer", ""): v.clone() for k, v in transformer.state_dict().items() if "lora_" not in k}


def run(transformer) -> torch.Tensor:
    """``output`` with the inputs in the transformer's dtype."""
    inputs = model_inputs(transformer)
    for key in ("hidden_states", "encoder_hidden_states"):
        inputs[key] = inputs[key].to(transformer.dtype)
    with torch.no_grad():
        return transformer(**inputs, return_dict=False)[0].float()


def scaling(pipe, layer: str, adapter: str) -> float:
    return pipe.transformer.get_submodule(layer).scaling[adapter]


@pytest.fixture(scope="module")
def base(tiny_model) -> torch.Tensor:
    return output(load_transformer(tiny_model))


# --- loading and switching, against PEFT ----------------------------------------------------------


def test_two_adapters_at_their_weights_give_what_peft_gives(tiny_model, adapters, base):
    pipe = pipeline(tiny_model)
    pipe.load_lora_weights(str(adapters["a"]), adapter_name="a")
    assert pipe.get_active_adapters() == ["a"]
    pipe.load_lora_weights(adapters["b"], adapter_name="b")
    # As in diffusers: the adapter loaded last is the one active, at weight 1.0.
    assert pipe.get_active_adapters() == ["b"]
    assert pipe.get_list_adapters() == {"transformer": ["a", "b"]}
    assert_close(output(pipe.transformer), oracle(tiny_model, [(adapters["b"], "b", 1.0)]), base)

    pipe.set_adapters(["a", "b"], [0.5, 1.0])
    assert pipe.get_active_adapters() == ["a", "b"]
    assert_close(output(pipe.transformer), oracle(tiny_model, [(adapters["a"], "a", 0.5), (adapters["b"], "b", 1.0)]), base)
    pipe.set_adapters("a")
    assert_close(output(pipe.transformer), oracle(tiny_model, [(adapters["a"], "a", 1.0)]), base)
    assert not any(p.requires_grad for p in pipe.transformer.parameters()), "an inference API leaves the model frozen"


def test_any_source_loads_the_same_adapter_and_names_follow_diffusers(tiny_model, adapters, base, tmp_path):
    weights = read_lora(adapters["a"])
    folder = tmp_path / "files"
    folder.mkdir()
    save_file(to_state_dict(weights, "comfyui"), str(folder / "a_comfyui.safetensors"))
    shutil.copy(folder / "a_comfyui.safetensors", folder / "other.safetensors")
    pipe = pipeline(tiny_model)
    pipe.load_lora_weights(adapters["a"])
    pipe.load_lora_weights(adapters["a"])  # the same file twice, under two names, as diffusers allows
    pipe.load_lora_weights(folder, weight_name="a_comfyui.safetensors", adapter_name="file")
    pipe.load_lora_weights(to_state_dict(weights, "diffusers"), adapter_name="dict")
    pipe.load_lora_weights(weights, adapter_name="weights")
    assert pipe.get_list_adapters() == {"transformer": ["default_0", "default_1", "file", "dict", "weights"]}
    expected = oracle(tiny_model, [(adapters["a"], "a", 1.0)])
    for name in pipe.get_list_adapters()["transformer"]:
        pipe.set_adapters(name)
        assert_close(output(pipe.transformer), expected, base)

    with pytest.raises(ValueError, match="Adapter name file already in use in the model - please select a new adapter name"):
        pipe.load_lora_weights(adapters["b"], adapter_name="file")
    pipe.set_adapters("default_1")
    pipe.delete_adapters(["default_0", "file", "dict", "weights"])
    pipe.load_lora_weights(adapters["b"])  # diffusers would name it default_1 (one adapter left) and load over it
    assert pipe.get_list_adapters() == {"transformer": ["default_1", "default_2"]}
    with pytest.raises(UserError, match="safetensors"):
        pipe.load_lora_weights(folder)  # two files: say which (weight_name)
    with pytest.raises(TypeError, match="weight_nam"):
        pipe.load_lora_weights(adapters["a"], weight_nam="x.safetensors")
    elsewhere = LoraWeights({"transformer_blocks.5.attn1.to_q": LoraModule(torch.ones(2, 8), torch.ones(8, 2), 2.0)})
    with pytest.raises(UserError, match="^elsewhere.safetensors: "):
        pipe.load_lora_weights(elsewhere, adapter_name="bad", source="elsewhere.safetensors")
    assert pipe.get_list_adapters() == {"transformer": ["default_1", "default_2"]}, "a refused LoRA leaves nothing behind"


def test_set_adapters_refuses_what_diffusers_refuses_and_reads_its_weight_forms(tiny_model, adapters, base, caplog):
    pipe = pipeline(tiny_model)
    pipe.load_lora_weights(adapters["a"], adapter_name="a")  # rank 4, alpha 8: scaling 2 at weight 1
    pipe.load_lora_weights(adapters["c"], adapter_name="c")  # rank 2, alpha 3, attention only
    with pytest.raises(ValueError, match=re.escape("Adapter name(s) {'x'} not in the list of present adapters")):
        pipe.set_adapters(["a", "x"])
    with pytest.raises(LoraApiError, match="Length of adapter names 2 is not equal to the length of the weights 1"):
        pipe.set_adapters(["a", "c"], [0.5])

    pipe.set_adapters(["a", "c"], [{"transformer": 0.5}, None])
    assert scaling(pipe, "transformer_blocks.0.attn1.to_q", "a") == 1.0
    assert scaling(pipe, "transformer_blocks.0.attn1.to_q", "c") == 1.5
    pipe.set_adapters(["a", "c"], {"transformer": 0.25})  # one dict for every adapter
    assert scaling(pipe, "transformer_blocks.0.ff.net.2", "a") == 0.5 and scaling(pipe, "transformer_blocks.1.attn2.to_k", "c") == 0.375
    with caplog.at_level("WARNING"):
        pipe.set_adapters("a", {"text_encoder": 0.3})
    assert "weights for ['text_encoder'] ignored" in caplog.text
    assert scaling(pipe, "transformer_blocks.0.attn1.to_q", "a") == 2.0
    pipe.set_adapters("a", {"transformer": {"transformer_blocks.1": 0.0, "attn2": 0.5}})
    assert scaling(pipe, "transformer_blocks.1.attn2.to_q", "a") == 0.0  # the first key that matches
    assert scaling(pipe, "transformer_blocks.0.attn2.to_q", "a") == 1.0
    assert scaling(pipe, "transformer_blocks.0.attn1.to_q", "a") == 2.0  # no key matches: weight 1

    pipe.set_adapters([])
    assert pipe.get_active_adapters() == []
    assert torch.equal(output(pipe.transformer), base)


def test_delete_disable_enable(tiny_model, adapters, base, caplog):
    pipe = pipeline(tiny_model)
    pipe.load_lora_weights(adapters["a"], adapter_name="a")
    pipe.load_lora_weights(adapters["b"], adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.5, 2.0])
    both = output(pipe.transformer)

    pipe.disable_lora()
    assert pipe.get_active_adapters() == ["a", "b"], "disabling keeps the active set"
    assert torch.equal(output(pipe.transformer), base)
    pipe.enable_lora()
    assert torch.equal(output(pipe.transformer), both)
    assert not any(p.requires_grad for p in pipe.transformer.parameters())

    with caplog.at_level("WARNING"):
        pipe.delete_adapters(["a", "nope"])  # diffusers skips a name not loaded
    assert "no adapter named nope is loaded" in caplog.text
    assert pipe.get_list_adapters() == {"transformer": ["b"]} and pipe.get_active_adapters() == ["b"]
    assert_close(output(pipe.transformer), oracle(tiny_model, [(adapters["b"], "b", 2.0)]), base)
    with pytest.raises(ValueError, match="not in the list of present adapters"):
        pipe.set_adapters("a")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*was active which is now deleted")
        pipe.delete_adapters("b")
    assert pipe.get_list_adapters() == {} and pipe.get_active_adapters() == []
    assert torch.equal(output(pipe.transformer), base)


# --- fusing and unloading ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fuse_gives_the_unfused_output_and_unfuse_restores_every_bit(tiny_model, adapters, dtype):
    pipe = pipeline(tiny_model, dtype=dtype)
    original = base_weights(pipe.transformer)
    pipe.load_lora_weights(adapters["a"], adapter_name="a")
    pipe.load_lora_weights(adapters["c"], adapter_name="c")
    pipe.set_adapters(["a", "c"], [0.5, 1.0])
    unfused = run(pipe.transformer)
    pipe.set_adapters(["a", "c"], [0.35, 0.7])
    at_lower_scale = run(pipe.transformer)
    pipe.set_adapters(["a", "c"], [0.5, 1.0])

    pipe.fuse_lora(lora_scale=0.7)
    assert pipe.fused_loras == {"a", "c"} and pipe.num_fused_loras == 2
    assert not torch.equal(base_weights(pipe.transformer)["transformer_blocks.0.attn1.to_q.weight"], original["transformer_blocks.0.attn1.to_q.weight"])
    if dtype == torch.float32:
        assert_close(run(pipe.transformer), at_lower_scale)
    pipe.unfuse_lora()
    assert pipe.fused_loras == set()
    restored = base_weights(pipe.transformer)
    assert all(torch.equal(restored[k], v) for k, v in original.items())
    # Unlike diffusers, the adapters are back at their set_adapters weights, not times lora_scale.
    assert torch.equal(run(pipe.transformer), unfused)

    pipe.fuse_lora(adapter_names=["a"])
    assert pipe.fused_loras == {"a"}
    pipe.disable_lora()  # disabling a fused model gives the base model exactly
    assert all(torch.equal(base_weights(pipe.transformer)[k], v) for k, v in original.items())
    pipe.enable_lora()
    pipe.unfuse_lora()
    assert all(torch.equal(base_weights(pipe.transformer)[k], v) for k, v in original.items())
    with pytest.raises(ValueError, match="text_encoder is not found"):
        pipe.fuse_lora(components=["text_encoder"])


def test_unload_leaves_the_original_modules_and_keeps_a_fused_update(tiny_model, adapters, base):
    pipe = pipeline(tiny_model)
    to_q = pipe.transformer.transformer_blocks[0].attn1.to_q
    pipe.load_lora_weights(adapters["a"], adapter_name="a")
    pipe.unload_lora_weights()
    assert pipe.transformer.transformer_blocks[0].attn1.to_q is to_q
    assert not any(isinstance(m, BaseTunerLayer) for m in pipe.transformer.modules())
    assert pipe.get_list_adapters() == {} and pipe.get_active_adapters() == []
    assert torch.equal(output(pipe.transformer), base)

    pipe.load_lora_weights(adapters["a"], adapter_name="a")  # loads again after an unload
    pipe.set_adapters("a", 0.5)
    expected = output(pipe.transformer)
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # diffusers' way to bake a LoRA in: fuse, unload, save
    assert isinstance(pipe.transformer.transformer_blocks[0].attn1.to_q, torch.nn.Linear)
    assert not any(isinstance(m, BaseTunerLayer) for m in pipe.transformer.modules())
    assert_close(output(pipe.transformer), expected, base)


def test_hotswap_replaces_the_weights_in_place(tiny_model, adapters, base, tmp_path):
    other = make_adapter(tiny_model, tmp_path / "other", seed=9)  # a's rank, alpha and layers
    pipe = pipeline(tiny_model)
    pipe.load_lora_weights(adapters["a"], adapter_name="x")
    to_q = pipe.transformer.transformer_blocks[0].attn1.to_q
    pipe.load_lora_weights(other, adapter_name="x", hotswap=True)
    assert pipe.transformer.transformer_blocks[0].attn1.to_q is to_q
    assert_close(output(pipe.transformer), oracle(tiny_model, [(other, "x", 1.0)]), base)
    with pytest.raises(ValueError, match="Trying to hotswap LoRA adapter 'y' but there is no existing adapter by that name"):
        pipe.load_lora_weights(other, adapter_name="y", hotswap=True)
    with pytest.raises(UserError, match="does not match adapter 'x'"):
        pipe.load_lora_weights(adapters["c"], adapter_name="x", hotswap=True)


# --- where LoRAs come from: the hub, offline ---------------------------------------------------


def test_a_hub_repo_loads_from_the_cache_and_an_uncached_one_fails_in_one_line(tiny_model, adapters, base, tmp_path):
    repo = tmp_path / "hub" / "models--someone--pixart-lora"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(adapters["a"], snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    save_file(to_state_dict(read_lora(adapters["c"]), "onetrainer"), str(snapshot / "c.safetensors"))
    pipe = pipeline(tiny_model)
    pipe.load_lora_weights("someone/pixart-lora", weight_name="adapter_model.safetensors", cache_dir=str(tmp_path / "hub"), adapter_name="a")
    pipe.load_lora_weights("someone/pixart-lora", weight_name="c.safetensors", cache_dir=str(tmp_path / "hub"), adapter_name="c")
    pipe.set_adapters(["a", "c"], [1.0, 0.5])
    assert_close(output(pipe.transformer), oracle(tiny_model, [(adapters["a"], "a", 1.0), (adapters["c"], "c", 0.5)]), base)

    with pytest.raises(UserError) as caught:
        pipe.load_lora_weights("someone/uncached-lora", weight_name="lora.safetensors")
    message = str(caught.value)
    assert "\n" not in message and "not in the local Hugging Face cache" in message and "'someone/uncached-lora'" in message
    with pytest.raises(UserError, match="has no file missing.safetensors"):
        pipe.load_lora_weights("someone/pixart-lora", weight_name="missing.safetensors", cache_dir=str(tmp_path / "hub"))
    with pytest.raises(UserError, match="neither a LoRA file or folder here nor a Hugging Face Hub id"):
        pipe.load_lora_weights(str(tmp_path / "no" / "such" / "adapter"))


# --- how a pipeline gets the methods ---------------------------------------------------------------


def test_the_import_gives_both_pixart_pipelines_the_methods_and_enable_lora_any_pixart_pipeline(tiny_model, adapters, base):
    assert all(getattr(PixArtSigmaPipeline, name) is getattr(PixArtSigmaLoraLoaderMixin, name) for name in API)
    assert install() is True  # again: nothing changes

    class HasItsOwn:
        def fuse_lora(self):
            pass

    assert install(HasItsOwn) is False and not hasattr(HasItsOwn, "load_lora_weights"), "all or nothing"

    sigma = pipeline(tiny_model)
    alpha = PixArtAlphaPipeline(**sigma.components)
    # PixArt-alpha's pipeline gets them on import too (what diffusers issue #9887 asks for).
    assert all(getattr(PixArtAlphaPipeline, name) is getattr(PixArtSigmaLoraLoaderMixin, name) for name in API)
    assert enable_lora(alpha) is alpha
    assert isinstance(alpha, PixArtAlphaPipeline) and type(alpha).__name__ == "PixArtAlphaPipeline"
    alpha.load_lora_weights(adapters["a"], adapter_name="a")
    assert sigma.get_list_adapters() == {"transformer": ["a"]}, "the two pipelines share one transformer"
    assert_close(output(alpha.transformer), oracle(tiny_model, [(adapters["a"], "a", 1.0)]), base)
    with pytest.raises(LoraApiError, match="has no PixArtTransformer2DModel"):
        enable_lora(object())


def test_the_lora_pipeline_class_loads_and_saves_as_a_plain_pipeline(tiny_model, adapters, base):
    pipe = PixArtSigmaLoraPipeline.from_pretrained(tiny_model)
    assert isinstance(pipe, PixArtSigmaPipeline)
    assert '"_class_name": "PixArtSigmaPipeline"' in pipe.to_json_string()
    pipe.load_lora_weights(adapters["a"])
    assert pipe.get_active_adapters() == ["default_0"]
    assert_close(output(pipe.transformer), oracle(tiny_model, [(adapters["a"], "a", 1.0)]), base)


# --- the documentation's example runs ----------------------------------------------------------------


def test_the_python_api_doc_runs_on_the_tiny_model(tiny_model, adapters, tmp_path):
    text = (REPO / "docs" / "python-api.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 2
    comfy = tmp_path / "subject_comfyui.safetensors"
    save_file(to_state_dict(read_lora(adapters["b"]), "comfyui"), str(comfy))
    substitutions = {
        '"PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"': repr(tiny_model),
        "torch.bfloat16": "torch.float32",
        '"cuda"': '"cpu"',
        "num_inference_steps=20": "num_inference_steps=2",
        '"runs/style/adapter"': repr(str(adapters["a"])),
        '"exports/subject_comfyui.safetensors"': repr(str(comfy)),
    }
    namespace: dict = {}
    for index, block in enumerate(blocks):
        for old, new in substitutions.items():
            block = block.replace(old, new)
        exec(compile(block, f"docs/python-api.md block {index}", "exec"), namespace)
        pipe = namespace["pipe"]
        if index == 0:
            assert pipe.get_active_adapters() == ["style", "subject"]
            assert pipe.transformer.transformer_blocks[0].attn1.to_q.scaling["style"] == pytest.approx(0.8 * 2.0)
    assert namespace["image"].size == (256, 256)
    assert pipe.get_list_adapters() == {}
    assert all(old in text for old in substitutions), "the doc changed: update the substitutions"


# --- the same calls as on a pipeline diffusers supports -------------------------------------------


def _sana_like():
    """diffusers' own LoRA methods on a tiny Sana transformer: the reference for names, active sets and errors."""
    from diffusers import SanaTransformer2DModel
    from diffusers.loaders.lora_pipeline import SanaLoraLoaderMixin
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    def sana():
        torch.manual_seed(0)
        return SanaTransformer2DModel(
            patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=4,
            num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8, sample_size=8,
        )

    def lora(targets: list[str]) -> dict[str, torch.Tensor]:
        model = sana()
        model.add_adapter(LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
        return {f"transformer.{k}": v for k, v in get_peft_model_state_dict(model).items()}

    class SanaLike(SanaLoraLoaderMixin):
        hf_device_map = None  # what the offloading check of diffusers' loader reads off a pipeline
        components: dict = {}

        def __init__(self):
            self.transformer = sana()

    return SanaLike(), (lora(["to_q"]), lora(["to_v"]))


def _script(pipe, first, second) -> list:
    """What each call returns or raises (type, and the message up to a set whose order varies)."""
    calls = [
        lambda: pipe.load_lora_weights(first), pipe.get_active_adapters, pipe.get_list_adapters,
        lambda: pipe.load_lora_weights(second), pipe.get_active_adapters,
        lambda: pipe.load_lora_weights(first, adapter_name="x"), pipe.get_active_adapters, pipe.get_list_adapters,
        lambda: pipe.load_lora_weights(second, adapter_name="x"),
        lambda: pipe.set_adapters(["x", "default_0"], [0.5, 1.0]), pipe.get_active_adapters,
        lambda: pipe.set_adapters(["nope"]),
        lambda: pipe.set_adapters(["x", "default_0"], [1.0]),
        pipe.disable_lora, pipe.get_active_adapters, pipe.enable_lora,
        lambda: pipe.delete_adapters("nope"), pipe.get_list_adapters,
        lambda: pipe.delete_adapters(["x"]), pipe.get_active_adapters, pipe.get_list_adapters,
        pipe.fuse_lora, lambda: pipe.fused_loras, pipe.unfuse_lora, lambda: pipe.fused_loras,
        lambda: pipe.fuse_lora(components=["text_encoder"]),
        lambda: pipe.load_lora_weights(first, adapter_name="zz", hotswap=True),
        pipe.unload_lora_weights, pipe.get_list_adapters, pipe.get_active_adapters,
        lambda: pipe.load_lora_weights(second), pipe.get_active_adapters,
    ]
    answers = []
    for call in calls:
        try:
            answers.append(("returns", call()))
        except Exception as error:  # the answer under test
            answers.append((type(error).__name__ if not isinstance(error, ValueError) else "ValueError", str(error).split(": {")[0]))
    return answers


def test_the_calls_answer_as_diffusers_answers_for_a_pipeline_it_supports(tiny_model, adapters, caplog):
    reference, loras = _sana_like()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = _script(reference, *loras)
        answers = _script(pipeline(tiny_model), adapters["a"], adapters["c"])
    assert answers == expected
