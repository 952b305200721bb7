"""Models published as a transformer alone (transformer/ only, or bare), with their components from elsewhere.

The tiny pipeline is split the ways PixArt checkpoints are published (read from
the Hub trees of PixArt-Sigma-XL-2-512-MS / -2K-MS, and diffusers' own tests,
which load those with ``subfolder="transformer"`` and take the rest from another
repository): the result of every verb must equal the whole pipeline's, bit for bit.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pixart_tune.family import ALPHA, SIGMA, detect_family
from pixart_tune.parts import TRANSFORMER_ONLY, forget_components, resolve_parts, use_components
from tests.training_fixtures import RED, TINY_RECIPE, prepare, tiny_config, write_flat_images


@pytest.fixture(scope="module")
def split(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """The tiny pipeline as a transformer/ folder, a bare transformer and a components folder."""
    root = tmp_path_factory.mktemp("split")
    full = Path(tiny_model)
    (root / "tonly").mkdir()
    shutil.copytree(full / "transformer", root / "tonly" / "transformer")
    shutil.copytree(full / "transformer", root / "bare")
    shutil.copytree(full, root / "comps")
    shutil.rmtree(root / "comps" / "transformer")
    index = json.loads((root / "comps" / "model_index.json").read_text())
    index["transformer"] = [None, None]  # as PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers has no transformer
    (root / "comps" / "model_index.json").write_text(json.dumps(index))
    source = write_flat_images(root / "source", RED, [(256, 256), (192, 320)], "a flat red colour", shaded=True)
    yield {"full": full, "tonly": root / "tonly", "bare": root / "bare", "comps": root / "comps", "source": source}
    for name in ("tonly", "bare"):
        forget_components(str(root / name))


def test_where_each_layout_finds_its_parts(split, caplog):
    full = resolve_parts(str(split["full"]))
    assert (full.transformer_subfolder, full.components, full.family) == ("transformer", str(split["full"]), SIGMA)
    bare = resolve_parts(str(split["bare"]), components=str(split["comps"]))
    assert (bare.transformer_subfolder, bare.components) == (None, str(split["comps"]))
    with caplog.at_level(logging.INFO, logger="pixart_tune.parts"):
        alone = resolve_parts(str(split["tonly"]))
    # Nothing named: the family's component repository, said once with how to change it.
    assert alone.components == SIGMA.components
    assert "holds a transformer alone" in caplog.text and "--components" in caplog.text
    # The official transformer-only repositories, without asking the network.
    for repo in sorted(TRANSFORMER_ONLY):
        assert resolve_parts(repo).components in (SIGMA.components, ALPHA.components)


def test_the_family_comes_from_the_vae_the_index_or_the_config():
    assert detect_family(None, {"scaling_factor": 0.18215}, None) is ALPHA
    assert detect_family(None, {"scaling_factor": 0.13025}, None) is SIGMA
    # The Sigma component repository names the alpha pipeline: its VAE decides.
    assert detect_family({"_class_name": "PixArtAlphaPipeline"}, {"scaling_factor": 0.13025}, None) is SIGMA
    assert detect_family({"_class_name": "PixArtSigmaPipeline"}, None, None) is SIGMA
    # PixArt-XL-2-1024-MS's config leaves out both keys; Sigma's configs write them.
    assert detect_family(None, None, {"sample_size": 128, "caption_channels": 4096}) is ALPHA
    assert detect_family(None, None, {"sample_size": 128, "interpolation_scale": 2, "use_additional_conditions": False}) is SIGMA
    assert detect_family(None, None, None, "PixArt-alpha/PixArt-LCM-XL-2-1024-MS") is ALPHA


def test_prepare_train_and_sample_on_a_transformer_alone_equal_the_whole_pipeline(split, tmp_path):
    from pixart_tune.sampling import SampleConfig, sample
    from pixart_tune.training.trainer import run

    whole = prepare(str(split["full"]), split["source"], tmp_path / "whole")
    use_components(str(split["tonly"]), str(split["comps"]))
    alone = prepare(str(split["tonly"]), split["source"], tmp_path / "alone")
    forget_components(str(split["tonly"]))  # from here on, dataset.json says where the components are
    manifest = json.loads((alone / "dataset.json").read_text())
    assert manifest["components"] == str(split["comps"])
    assert [i["latent_key"] for i in manifest["items"]] == [i["latent_key"] for i in json.loads((whole / "dataset.json").read_text())["items"]]

    steps = ["schedule.steps=3", "checkpoint.every=0"]
    run(tiny_config(str(split["full"]), whole, tmp_path / "run-whole", *steps), progress=False)
    run(tiny_config(str(split["tonly"]), alone, tmp_path / "run-alone", *steps), progress=False)
    a, b = (load_file(tmp_path / run_dir / "adapter" / "adapter_model.safetensors") for run_dir in ("run-whole", "run-alone"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    drawn = {}
    for name, components in (("full", None), ("bare", str(split["comps"]))):
        config = SampleConfig(model=str(split[name]), components=components, prompts=["a red cat"], seeds=[3], steps=2,
                              adapters=[str(tmp_path / "run-alone" / "adapter")], out=str(tmp_path / f"samples-{name}"), device="cpu")
        result = sample(config)
        drawn[name] = [np.asarray(Image.open(path)) for path in result.images]
    assert all(np.array_equal(x, y) for x, y in zip(drawn["full"], drawn["bare"]))


def test_a_components_folder_missing_a_part_is_refused_naming_it(split, tmp_path):
    from pixart_tune.cli import main

    broken = tmp_path / "broken"
    shutil.copytree(split["comps"], broken)
    shutil.rmtree(broken / "vae")
    code = main(["prepare", str(split["source"]), "--out", str(tmp_path / "out"), "--model", str(split["tonly"]), "--components", str(broken)])
    assert code == 1
    assert not (tmp_path / "out").exists()


def test_alpha_micro_conditions_are_what_its_pipeline_passes(tiny_model):
    """The family's conditions equal those PixArtAlphaPipeline gives a 1024-px-class transformer (sample_size 128)."""
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel

    pipe = PixArtAlphaPipeline.from_pretrained(tiny_model)
    # Width 48: the size embedder splits it in three (resolution 2/3, aspect 1/3).
    config = dict(pipe.transformer.config, sample_size=128, use_additional_conditions=True, attention_head_dim=24, cross_attention_dim=48)
    transformer = PixArtTransformer2DModel.from_config(config)
    seen = {}

    def spy(module, args, kwargs):
        seen.update(kwargs["added_cond_kwargs"])

    transformer.register_forward_pre_hook(spy, with_kwargs=True)
    pipe.transformer = transformer
    pipe("a cat", num_inference_steps=2, height=192, width=320, use_resolution_binning=False, guidance_scale=1.0, output_type="latent")
    expected = ALPHA.micro_conditions(transformer.config, 192, 320, 1, "cpu", seen["resolution"].dtype)
    assert torch.equal(seen["resolution"], expected["resolution"]) and torch.equal(seen["aspect_ratio"], expected["aspect_ratio"])
    assert SIGMA.micro_conditions(pipe.transformer.config | {"use_additional_conditions": False}, 192, 320, 1, "cpu", torch.float32) == {
        "resolution": None, "aspect_ratio": None}


def test_a_deeper_model_trains_plans_and_exports_by_its_own_config(split, tmp_path, capsys):
    """As SimpleTuner's 900M PixArt (42 blocks): depth comes from the model's config, never XL-2's 28."""
    from diffusers import PixArtTransformer2DModel

    from pixart_tune.adapters.export import export_file
    from pixart_tune.adapters.loader import read_lora
    from pixart_tune.cli import main
    from pixart_tune.tiny import tiny_transformer_config
    from pixart_tune.training.trainer import run

    deeper = tmp_path / "deeper"
    shutil.copytree(split["full"], deeper)
    shutil.rmtree(deeper / "transformer")
    torch.manual_seed(0)
    PixArtTransformer2DModel.from_config(tiny_transformer_config(layers=3)).save_pretrained(deeper / "transformer")
    data = prepare(str(deeper), split["source"], tmp_path / "prepared")
    adapter = run(tiny_config(str(deeper), data, tmp_path / "run", "schedule.steps=2", "checkpoint.every=0"), progress=False)
    weights = load_file(adapter / "adapter_model.safetensors")
    assert any(key.startswith("transformer_blocks.2.") for key in weights), "the third block was not trained"
    exported = export_file(read_lora(adapter), "onetrainer", tmp_path / "onetrainer.safetensors")
    assert any("transformer_blocks_2_" in key for key in load_file(exported))
    assert main(["plan", str(TINY_RECIPE), f"model={deeper}", "validation.prompts=[]"]) in (0, 3)
    assert "3 layers" in capsys.readouterr().out


def test_the_app_previews_a_transformer_alone_with_its_components(split, tmp_path):
    from pixart_tune.app.service import AppSettings, PreviewApp
    from tests.test_app import make_adapter

    runs = tmp_path / "runs"
    adapter = make_adapter(str(split["full"]), runs / "a" / "final", seed=1)
    images = {}
    for name, components in (("full", None), ("tonly", str(split["comps"]))):
        app = PreviewApp(AppSettings(models=[str(split[name])], runs=runs, components=components, device="cpu"))
        images[name] = app.compare(str(split[name]), "a red cat", "", 3, 2, 4.5, "256x256", [str(adapter)], [1.0])
    for whole, alone in zip(images["full"], images["tonly"]):
        assert np.array_equal(np.asarray(whole), np.asarray(alone))
