"""Every export format round-trips, ComfyUI files apply as ComfyUI applies them, publish folders are complete
and carry names, never local paths. (What city96's ComfyUI_ExtraModels does with each file: test_city96.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors import safe_open

from pixart_tune.adapters.card import parse_front_matter
from pixart_tune.adapters.export import FORMATS, export_adapter, public_metadata
from pixart_tune.adapters.loader import AdapterSpec, load_adapters, read_lora
from pixart_tune.base import ADAPTER_CONFIG, ADAPTER_WEIGHTS, REAL_MODEL_ID
from pixart_tune.commands.export import main as cli
from pixart_tune.errors import UserError
from pixart_tune.generation import save_png
from pixart_tune.models import load_transformer
from tests.adapter_fixtures import adapters, assert_close, make_adapter, output, peft_load  # noqa: F401  (adapters: a fixture)
from tests.training_fixtures import red_dataset, tiny_config  # noqa: F401  (red_dataset: a fixture)


@pytest.fixture(scope="module")
def everywhere(tiny_model, tmp_path_factory):
    """An adapter on every linear layer (inside and outside the blocks), with its output."""
    path = make_adapter(tiny_model, tmp_path_factory.mktemp("everywhere") / "all", seed=11, rank=3, alpha=5.0, targets="all_linear")
    transformer = load_transformer(tiny_model)
    base = output(transformer)
    peft_load(transformer, path)
    return path, output(transformer), base


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_export_loads_back_to_the_same_outputs(fmt, tiny_model, everywhere, tmp_path):
    path, expected, base = everywhere
    [file] = export_adapter(path, [fmt], tmp_path / f"x_{fmt}.safetensors")
    with safe_open(str(file), framework="pt") as handle:
        keys = list(handle.keys())
        assert handle.metadata()["pixart_tune_layout"] == FORMATS[fmt][0]
    assert any(k.endswith(".alpha") for k in keys), "alpha must always be stored"
    transformer = load_transformer(tiny_model)
    load_adapters(transformer, [AdapterSpec(str(file))])
    assert_close(output(transformer), expected, base)


# An independent copy of the original PixArt checkpoint's layer names (what ComfyUI's model uses).
def _original_layers(block: int) -> dict[str, list[str]]:
    d = f"transformer_blocks.{block}."
    return {
        f"blocks.{block}.attn.qkv": [d + "attn1.to_q", d + "attn1.to_k", d + "attn1.to_v"],
        f"blocks.{block}.attn.proj": [d + "attn1.to_out.0"],
        f"blocks.{block}.cross_attn.q_linear": [d + "attn2.to_q"],
        f"blocks.{block}.cross_attn.kv_linear": [d + "attn2.to_k", d + "attn2.to_v"],
        f"blocks.{block}.cross_attn.proj": [d + "attn2.to_out.0"],
        f"blocks.{block}.mlp.fc1": [d + "ff.net.0.proj"],
        f"blocks.{block}.mlp.fc2": [d + "ff.net.2"],
    }


_OUTER = {
    "t_block.1": ["adaln_single.linear"],
    "t_embedder.mlp.0": ["adaln_single.emb.timestep_embedder.linear_1"],
    "t_embedder.mlp.2": ["adaln_single.emb.timestep_embedder.linear_2"],
    "y_embedder.y_proj.fc1": ["caption_projection.linear_1"],
    "y_embedder.y_proj.fc2": ["caption_projection.linear_2"],
    "final_layer.linear": ["proj_out"],
}


def _apply_like_comfyui(transformer, state: dict[str, torch.Tensor], prefix: str) -> int:
    """ComfyUI's 'lora' patch: W += alpha / down.shape[0] * up @ down on the original (fused) weight.

    Also asserts that city96's fused-qkv fallback (which chunks up and down when their
    shapes look concatenated) does not kick in, so both loaders take the plain path.
    """
    layers = dict(_OUTER)
    for block in range(transformer.config.num_layers):
        layers.update(_original_layers(block))
    modules = {k[: -len(".lora_up.weight")] for k in state if k.endswith(".lora_up.weight")}
    with torch.no_grad():
        for key in modules:
            assert key.startswith(prefix)
            parts = [transformer.get_submodule(n) for n in layers[key[len(prefix):]]]
            up, down = state[f"{key}.lora_up.weight"], state[f"{key}.lora_down.weight"]
            alpha = state[f"{key}.alpha"].item()
            ch1, ch2 = up.shape[0] // down.shape[1], down.shape[0] // up.shape[1]
            assert not (up.shape[0] != down.shape[1] and ch1 == ch2), f"city96's chunked path would misread {key}"
            weight = torch.cat([p.weight for p in parts]) + alpha / down.shape[0] * up @ down
            for part, rows in zip(parts, weight.chunk(len(parts))):
                part.weight.copy_(rows)
    return len(modules)


@pytest.mark.parametrize(("fmt", "prefix"), [("comfyui", "diffusion_model."), ("pixart", "")])
def test_comfyui_layouts_apply_as_comfyui_applies_them(fmt, prefix, tiny_model, everywhere, tmp_path):
    path, expected, base = everywhere
    [file] = export_adapter(path, [fmt], tmp_path / "x.safetensors")
    with safe_open(str(file), framework="pt") as handle:
        state = {k: handle.get_tensor(k) for k in handle.keys()}
    # city96's loader would treat a file with this key as PEFT and ignore its alphas.
    assert not any(k.endswith("adaln_single.linear.lora_A.weight") for k in state)
    transformer = load_transformer(tiny_model)
    count = _apply_like_comfyui(transformer, state, prefix)
    # Seven original layers per block (qkv, proj, q_linear, kv_linear, cross proj, fc1, fc2) + six outside.
    assert count == 7 * transformer.config.num_layers + 6
    assert_close(output(transformer), expected, base)


def test_export_all_and_refusals(everywhere, tmp_path, capsys):
    path, _, _ = everywhere
    assert cli([str(path), "--format", "all", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(f"all_{f}.safetensors" for f in FORMATS)
    assert "city96" in printed and "ComfyUI core" in printed
    with pytest.raises(UserError, match="exists.*--overwrite"):
        cli([str(path), "--format", "all", "--out", str(tmp_path / "out")])
    with pytest.raises(UserError, match="--format FORMAT --out PATH, or --publish"):
        cli([str(path)])


def test_publish_folder_has_card_adapter_comfyui_files_and_samples(tiny_model, adapters, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    shutil.copytree(adapters["a"], run / "adapter")
    (run / "samples").mkdir()
    Image.new("RGB", (64, 64), "red").save(run / "samples" / "step-000050.png")
    Image.new("RGB", (64, 64), "blue").save(run / "samples" / "step-000100.png")
    out = tmp_path / "publish"
    assert cli([str(run / "adapter"), "--publish", str(out), "--name", "my-style", "--tag", "style"]) == 0
    card = (out / "README.md").read_text()
    matter = parse_front_matter(card)
    assert matter["base_model"] == "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"
    assert matter["instance_prompt"] == "sks" and matter["license"] == "openrail++"
    assert {"lora", "pixart-sigma", "style"} <= set(matter["tags"])
    [widget] = matter["widget"]
    assert (out / widget["output"]["url"]).is_file() and widget["text"] == "sks"
    with Image.open(out / widget["output"]["url"]) as image:
        assert image.getpixel((0, 0)) == (0, 0, 255)  # the newest validation grid
    assert "| steps | `100` |" in card and "learning_rate" not in matter
    assert "my-style_comfyui.safetensors" in card and "my-style_onetrainer.safetensors" in card
    assert "## Use in ComfyUI" in card and "LoraLoaderModelOnly" in card and "PixArt Load LoRA" in card
    # The folder itself and each ComfyUI file load back to the same adapter.
    reference = read_lora(adapters["a"])
    for candidate in (out, out / "my-style_comfyui.safetensors", out / "my-style_onetrainer.safetensors"):
        loaded = read_lora(candidate)
        for name, module in reference.modules.items():
            assert torch.allclose(loaded.modules[name].delta(), module.delta(), atol=1e-5), (candidate, name)


def test_publish_uses_prompts_stored_in_sample_pngs_and_push_needs_a_login(adapters, tmp_path):  # noqa: F811
    sample = save_png(Image.new("RGB", (32, 32)), tmp_path / "s.png", {"prompt": "sks cat on a table", "seed": 1})
    out = tmp_path / "publish"
    with pytest.raises(UserError, match="hf auth login"):
        cli([str(adapters["a"]), "--publish", str(out), "--samples", str(sample), "--push-to-hub", "me/my-lora"])
    matter = parse_front_matter((out / "README.md").read_text())
    assert matter["widget"][0]["text"] == "sks cat on a table"


def test_only_hub_ids_become_the_cards_base_model(tmp_path):
    from pixart_tune.adapters.card import CardInfo, render
    from pixart_tune.adapters.export import looks_like_hub_id

    (tmp_path / "owner").mkdir()
    assert looks_like_hub_id("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS")
    for local in ("models/pixart-sigma-local/x", "./tiny", "/abs/model", "~/model", "tiny", str(tmp_path / "owner"), "bad//name"):
        assert not looks_like_hub_id(local), local
    card = render(CardInfo(name="x", base_model="PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", repo_id="me/my-lora"))
    assert 'snapshot_download("me/my-lora")' in card and "AdapterSpec(adapter" in card


def test_public_metadata_keeps_names_and_hub_ids_and_drops_local_paths():
    header = {
        "base_model": "/home/me/models/pixart-sigma/",
        "training_config": json.dumps({
            "model": "./tiny", "output_dir": "runs/style/v2", "init_adapter": None,
            "data": {"path": "C:\\data\\set", "extra": [{"path": "~/more", "repeats": 2}]},
            "validation": {"prompts": ["a cat / dog on a sofa/bed"]},
        }),
        "merged_from": json.dumps([{"path": "/abs/a", "weight": 1.0}, {"path": "owner/name", "weight": 0.5}]),
        "steps": "100",
        "trigger_words": json.dumps(["sks"]),
        "homepage": "https://huggingface.co/owner/name",
    }
    public = public_metadata(header)
    assert public["base_model"] == "pixart-sigma"
    config = json.loads(public["training_config"])
    assert (config["model"], config["output_dir"], config["init_adapter"]) == ("tiny", "v2", None)
    assert config["data"] == {"path": "set", "extra": [{"path": "more", "repeats": 2}]}
    assert config["validation"]["prompts"] == ["a cat / dog on a sofa/bed"]
    assert json.loads(public["merged_from"]) == [{"path": "a", "weight": 1.0}, {"path": "owner/name", "weight": 0.5}]
    for key in ("steps", "trigger_words", "homepage"):
        assert public[key] == header[key]
    assert public_metadata({"base_model": REAL_MODEL_ID}) == {"base_model": REAL_MODEL_ID}


def test_exports_and_publish_folders_of_a_trained_adapter_carry_no_local_path(tiny_model, red_dataset, tmp_path, tmp_path_factory):  # noqa: F811
    from pixart_tune.training.trainer import Trainer

    local = str(tmp_path_factory.getbasetemp())
    assert Path(tiny_model).is_absolute() and tiny_model.startswith(local)
    config = tiny_config(tiny_model, red_dataset, tmp_path / "run", "schedule.steps=2", "checkpoint.every=0", "trigger_words=[sks]")
    trainer = Trainer(config, progress=False)
    trainer.setup()
    try:
        adapter = trainer.train()
    finally:
        trainer.cleanup()
    # The trainer records the model folder, the dataset and its output folder as it was given them.
    assert local.encode() in (adapter / ADAPTER_WEIGHTS).read_bytes()
    sample = save_png(Image.new("RGB", (32, 32), "red"), tmp_path / "sample.png", {
        "prompt": "sks", "seed": 1, "model": tiny_model, "adapters": [{"path": str(adapter), "scale": 1.0}],
    })
    other = PngInfo()  # another tool's PNG: a text line and a JSON workflow, both naming local files
    other.add_text("parameters", f"sks\nSteps: 20, Model: {tiny_model}/transformer")
    other.add_text("workflow", json.dumps({"nodes": [{"widgets_values": [f"{tmp_path}/lora.safetensors", 1.0]}]}))
    Image.new("RGB", (32, 32), "blue").save(tmp_path / "other.png", pnginfo=other)
    assert cli([str(adapter), "--format", "all", "--out", str(tmp_path / "exported")]) == 0
    assert cli([str(adapter), "--publish", str(tmp_path / "publish"), "--samples", str(sample), str(tmp_path / "other.png")]) == 0
    written = [p for folder in ("exported", "publish") for p in sorted((tmp_path / folder).rglob("*")) if p.is_file()]
    assert len(written) == len(FORMATS) + 7  # README, adapter + config, comfyui, onetrainer, two images
    for file in written:
        assert local.encode() not in file.read_bytes(), f"{file} holds a local path"
    with safe_open(str(tmp_path / "exported" / "adapter_diffusers.safetensors"), framework="pt") as handle:
        header = handle.metadata()
    trained = json.loads(header["training_config"])
    assert (header["base_model"], trained["model"], trained["data"]["path"], trained["output_dir"]) == ("tiny", "tiny", "prepared", "run")
    assert json.loads((tmp_path / "publish" / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == REAL_MODEL_ID
    assert parse_front_matter((tmp_path / "publish" / "README.md").read_text())["base_model"] == REAL_MODEL_ID
    with Image.open(tmp_path / "publish" / "images" / "sample_0.png") as image:
        shown = json.loads(image.text["pixart-tune"])
        assert image.getpixel((0, 0)) == (255, 0, 0)
    assert shown == {"prompt": "sks", "seed": 1, "model": "tiny", "adapters": [{"path": "adapter", "scale": 1.0}]}
    with Image.open(tmp_path / "publish" / "images" / "sample_1.png") as image:
        assert image.text["parameters"] == "sks\nSteps: 20, Model: transformer"
        assert json.loads(image.text["workflow"]) == {"nodes": [{"widgets_values": ["lora.safetensors", 1.0]}]}
    with pytest.raises(UserError, match="local path.*Hub id"):
        cli([str(adapter), "--publish", str(tmp_path / "again"), "--base-model", tiny_model])
