"""A LoRA file with a T5 part (OneTrainer writes one when the text encoder trained) is
applied where T5 is loaded: ``sample`` and the app go through the Sampler, which loads
through the diffusers-style methods, and the T5 part follows the adapter's scale."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pixart_tune.sampling import AdapterSpec, Sampler
from tests.wild_fixtures import load_text_encoder, onetrainer


def effective_outputs(text_encoder, names, x_by_name):
    with torch.no_grad():
        return {name: text_encoder.get_submodule(name)(x_by_name[name]) for name in names}


def test_the_t5_part_of_a_onetrainer_file_follows_the_adapter_in_the_sampler(tiny_model, tmp_path):
    wild = onetrainer(tiny_model, tmp_path, "LEGACY", text_encoder=True)
    assert wild.text_encoder, "the fixture trains T5 too"
    base = load_text_encoder(tiny_model)
    sampler = Sampler(tiny_model, device="cpu")
    names = sorted(wild.text_encoder)
    generator = torch.Generator().manual_seed(0)
    inputs = {n: torch.randn(3, base.get_submodule(n).in_features, generator=generator) for n in names}

    for scale in (0.5, 1.0, 0.0):
        sampler.activate([AdapterSpec(str(wild.path), scale)] if scale else [])
        got = effective_outputs(sampler.pipe.text_encoder, names, inputs)
        for name in names:
            weight = base.get_submodule(name).weight + scale * wild.text_encoder[name]
            torch.testing.assert_close(got[name], F.linear(inputs[name], weight), rtol=1e-5, atol=1e-5)
    assert sampler.pipe.get_list_adapters().keys() == {"transformer", "text_encoder"}


def test_pipe_load_lora_weights_puts_the_t5_part_into_the_text_encoder(tiny_model, tmp_path):
    from diffusers import PixArtSigmaPipeline

    import pixart_tune.adapters.pipeline_lora  # noqa: F401  (adds the LoRA methods)

    wild = onetrainer(tiny_model, tmp_path, "COMFY", text_encoder=True)
    pipe = PixArtSigmaPipeline.from_pretrained(tiny_model)
    pipe.load_lora_weights(str(wild.path), adapter_name="ot")
    assert pipe.get_list_adapters() == {"transformer": ["ot"], "text_encoder": ["ot"]}
    pipe.delete_adapters("ot")
    assert pipe.get_list_adapters() == {}
