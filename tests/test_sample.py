"""The adapter-aware Sampler and the ``sample`` verb on the tiny pipeline."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from pixart_tune.adapters.layouts import to_state_dict
from pixart_tune.adapters.loader import read_lora
from pixart_tune.commands.sample import main as cli
from pixart_tune.errors import UserError
from pixart_tune.sampling import AdapterSpec, Sampler
from tests.adapter_fixtures import adapters, make_adapter  # noqa: F401  (adapters: a fixture)

STEPS = 2


@pytest.fixture(scope="module")
def sampler(tiny_model):
    return Sampler(tiny_model, device="cpu")


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_buckets_follow_the_models_resolution(sampler):
    buckets = sampler.buckets()
    assert (256, 256) in buckets and len(buckets) > 20
    assert all(h % 16 == 0 and w % 16 == 0 for h, w in buckets)


def test_adapters_switch_on_and_off_between_calls(sampler, adapters):  # noqa: F811
    a = AdapterSpec(str(adapters["a"]), 1.0)
    base = sampler.generate(["a photo of a cat"], [3], steps=STEPS)[0]
    adapted = sampler.generate(["a photo of a cat"], [3], [a], steps=STEPS)[0]
    zero = sampler.generate(["a photo of a cat"], [3], [AdapterSpec(a.path, 0.0)], steps=STEPS)[0]
    again = sampler.generate(["a photo of a cat"], [3], steps=STEPS)[0]
    assert base.size == (256, 256)
    assert np.abs(_pixels(adapted) - _pixels(base)).mean() > 1.0
    assert np.array_equal(_pixels(zero), _pixels(base))
    assert np.array_equal(_pixels(again), _pixels(base))
    assert len(sampler._loaded) == 1  # read and injected once


def test_a_file_in_another_layout_draws_the_same_image(sampler, adapters, tmp_path):  # noqa: F811
    path = tmp_path / "a_comfyui.safetensors"
    save_file(to_state_dict(read_lora(adapters["a"]), "comfyui"), str(path))
    folder = sampler.generate(["a red flower"], [1], [AdapterSpec(str(adapters["a"]), 0.7)], steps=STEPS)[0]
    comfy = sampler.generate(["a red flower"], [1], [AdapterSpec(str(path), 0.7)], steps=STEPS)[0]
    assert np.abs(_pixels(folder) - _pixels(comfy)).max() <= 1


def test_a_rewritten_adapter_is_read_again(sampler, tiny_model, tmp_path):
    path = make_adapter(tiny_model, tmp_path / "live", seed=7)
    first = sampler.generate(["a dog"], [0], [AdapterSpec(str(path))], steps=STEPS)[0]
    make_adapter(tiny_model, tmp_path / "live", seed=8)
    for file in path.iterdir():  # the same second on a coarse clock must not hide the change
        os.utime(file, ns=(file.stat().st_atime_ns, file.stat().st_mtime_ns + 10**9))
    second = sampler.generate(["a dog"], [0], [AdapterSpec(str(path))], steps=STEPS)[0]
    assert not np.array_equal(_pixels(first), _pixels(second))


def test_bad_requests_are_user_errors(sampler, tmp_path):
    with pytest.raises(UserError, match="2 prompts but 1 seeds"):
        sampler.generate(["a", "b"], [0], steps=STEPS)
    with pytest.raises(UserError, match="multiple of 16"):
        sampler.generate(["a"], [0], steps=STEPS, height=200, width=256)
    with pytest.raises(UserError, match="does not exist"):
        sampler.generate(["a"], [0], [AdapterSpec(str(tmp_path / "missing"))], steps=STEPS)


def test_sample_verb_writes_pngs_with_parameters_and_a_grid(tiny_model, adapters, tmp_path):  # noqa: F811
    out = tmp_path / "samples"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# one prompt a line\na rocket\n")
    code = cli([
        "--model", tiny_model, "--prompt", "a cat", "--prompts-file", str(prompts), "--seeds", "2", "--steps", str(STEPS),
        "--adapter", f"{adapters['a']}:0.8", "--aspect", "0.5", "--negative-prompt", "blurry", "--out", str(out),
    ])
    assert code == 0
    pngs = sorted(p for p in out.glob("*.png") if p.name != "grid.png")
    assert len(pngs) == 2 * 2  # base + adapter rows, 2 prompts x 1 seed
    with Image.open(pngs[-1]) as image:
        parameters = json.loads(image.text["pixart-tune"])
        assert image.size[0] > image.size[1]  # aspect 0.5 = wider than tall
        assert "Negative prompt: blurry" in image.text["parameters"]
    assert parameters["seed"] == 2 and parameters["prompt"] == "a rocket" and parameters["steps"] == STEPS
    assert parameters["adapters"] == [{"path": str(adapters["a"]), "scale": 0.8}]
    with Image.open(out / "grid.png") as grid, Image.open(pngs[0]) as one:
        assert grid.width >= 2 * one.width and grid.height >= 2 * one.height


def test_sample_verb_sweeps_one_adapters_scale(tiny_model, adapters, tmp_path):  # noqa: F811
    out = tmp_path / "sweep"
    cli(["--model", tiny_model, "--prompt", "a cat", "--steps", str(STEPS), "--adapter", str(adapters["a"]), "--sweep", "0,1", "--no-base", "--out", str(out)])
    rows = sorted(out.glob("0*_000_seed0.png"))
    assert len(rows) == 2
    with Image.open(rows[0]) as zero, Image.open(rows[1]) as one:
        assert json.loads(zero.text["pixart-tune"])["adapters"][0]["scale"] == 0.0
        assert np.abs(_pixels(zero) - _pixels(one)).mean() > 1.0


def test_sample_verb_refuses_bad_input_before_loading(tiny_model, tmp_path):
    with pytest.raises(UserError, match="at least one --prompt"):
        cli(["--model", tiny_model, "--out", str(tmp_path)])
    with pytest.raises(UserError, match="--sweep needs an --adapter"):
        cli(["--model", tiny_model, "--prompt", "x", "--sweep", "0,1", "--out", str(tmp_path)])
    (tmp_path / "x.pt").write_bytes(b"")
    with pytest.raises(UserError, match="pickle"):
        cli(["--model", tiny_model, "--prompt", "x", "--adapter", str(tmp_path / "x.pt"), "--out", str(tmp_path)])


def test_an_fp16_vae_that_asks_for_it_decodes_in_fp32(tiny_model):
    """The SDXL VAE overflows in fp16; ``force_upcast`` in its config makes the decode fp32."""
    from diffusers import PixArtSigmaPipeline

    from pixart_tune.generation import decode_latents

    pipe = PixArtSigmaPipeline.from_pretrained(tiny_model)
    assert pipe.vae.config.force_upcast
    with torch.no_grad():
        # Weights large enough that the decoder's first convolutions overflow fp16,
        # small enough to stay finite in fp16 themselves.
        pipe.vae.post_quant_conv.weight.mul_(1e3)
        pipe.vae.decoder.conv_in.weight.mul_(1e3)
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = _pixels(decode_latents(pipe, latents)[0])

    pipe.vae.to(torch.float16)
    with torch.no_grad():
        plain = pipe.vae.decode(latents.half() / pipe.vae.config.scaling_factor, return_dict=False)[0]
    assert not torch.isfinite(plain).all(), "the weights no longer overflow fp16: the test shows nothing"
    upcast = _pixels(decode_latents(pipe, latents.half())[0])
    assert np.abs(upcast - reference).max() <= 2
    assert pipe.vae.dtype == torch.float16, "the VAE is left in the dtype it had"


def test_scale_zero_is_the_base_model_even_for_dora(sampler, tiny_model, tmp_path):
    """A DoRA adapter at scaling 0 still rescales the weights by its magnitudes; scale 0 must mean off."""
    from pixart_tune.adapters import lora
    from tests.adapter_fixtures import filled_transformer

    settings = lora.LoraSettings(rank=4, alpha=8.0, dora=True)
    dora = lora.save_adapter(filled_transformer(tiny_model, settings, seed=5), tmp_path / "dora", settings)
    base = _pixels(sampler.generate(["a photo of a cat"], [3], steps=STEPS)[0])
    off = _pixels(sampler.generate(["a photo of a cat"], [3], [AdapterSpec(str(dora), 0.0)], steps=STEPS)[0])
    on = _pixels(sampler.generate(["a photo of a cat"], [3], [AdapterSpec(str(dora), 1.0)], steps=STEPS)[0])
    assert np.abs(on - base).mean() > 2.0, "the DoRA adapter does not change the image: the test shows nothing"
    assert np.array_equal(off, base)
