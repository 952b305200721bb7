"""The VAE both ways: latents written with the config's scaling and shift decode back to the VAE's own output."""

from __future__ import annotations

import json
import shutil

import torch
from PIL import Image

from pixart_tune.encoders import LatentEncoder, images_to_tensor, vae_decode
from pixart_tune.models import load_vae
from tests.conftest import REPO


def _with_shift(tiny_model, tmp_path, shift: float):
    model = tmp_path / f"shift{shift}"
    shutil.copytree(tiny_model, model)
    config_file = model / "vae" / "config.json"
    config = json.loads(config_file.read_text())
    config["shift_factor"] = shift
    config_file.write_text(json.dumps(config))
    return str(model)


def test_scaling_and_shift_are_undone_on_decode(tiny_model, tmp_path):
    photo = Image.open(REPO / "datasets" / "samples" / "coffee.jpg").convert("RGB").resize((64, 64))
    plain_model, shifted_model = tiny_model, _with_shift(tiny_model, tmp_path, 0.75)
    plain = LatentEncoder(plain_model, torch.device("cpu")).encode([photo])
    shifted = LatentEncoder(shifted_model, torch.device("cpu")).encode([photo])
    vae = load_vae(shifted_model)
    scaling = vae.config.scaling_factor
    # The cache holds (mean - shift) * scaling: the two models' latents differ by exactly that.
    assert torch.allclose(plain - shifted, torch.full_like(plain, 0.75 * scaling), atol=1e-5)

    with torch.no_grad():
        expected = vae.decode(vae.encode(images_to_tensor([photo])).latent_dist.mode()).sample
    assert torch.allclose(vae_decode(vae, shifted), expected, atol=1e-4)
    assert torch.allclose(vae_decode(load_vae(plain_model), plain), expected, atol=1e-4)
    # Ignoring the shift on decode (as before) draws something else.
    with torch.no_grad():
        unshifted = vae.decode(shifted / scaling).sample
    assert (unshifted - expected).abs().max() > 1e-2
