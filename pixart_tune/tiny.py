"""The tiny PixArt-Sigma pipeline (``pixart-tune init-tiny``): every component of the
real one at a few hundred kB, built offline and saved in the diffusers layout.

The tokenizer is a T5 unigram vocabulary trained here, the text encoder and the
transformer are random, and the VAE reconstructs colours and coarse shapes
(:mod:`pixart_tune.tiny_vae`), so decoded images mean something.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any, Literal

import torch

from pixart_tune.base import INTERPOLATION_SCALE, MAX_TOKENS
from pixart_tune.models import XL2_TRANSFORMER_CONFIG
from pixart_tune.tiny_vae import build_tiny_vae

TINY_BETA_END = 0.005
"""Last DDPM beta of the tiny pipeline's schedule (PixArt-Sigma's is 0.02).

Sampling estimates the clean latent as (x_t - sqrt(1 - a) eps) / sqrt(a), a the
alpha-bar of the step. PixArt's schedule ends at a = 4e-5, so the first steps
multiply the model's noise error by about 156: only a trained denoiser survives
that, and the tiny transformer is random, so every sample came out as saturated
colour noise, with or without a LoRA. Ending at 0.005 (a = 0.078 at t = 999)
multiplies it by 3.5, and what a LoRA learns shows in samples drawn from pure
noise. The trainer and the sampler read the schedule from the model folder, so
the same code serves both schedules.
"""

# A small corpus for the tiny tokenizer: photo and art vocabulary, so that real
# captions split into real pieces instead of <unk>.
_WORDS = """a an the of in on at with and or to from by for photo photograph picture painting drawing
illustration portrait landscape close up view shot style art render anime watercolor oil sketch cat dog
person man woman girl boy child astronaut rocket coffee cup saucer table wooden galaxy space sky blue red
green yellow orange purple pink black white gray brown gold silver flat color colour bright dark light
shadow sun moon star stars night day morning evening sunset city street house tree forest mountain river
lake sea ocean beach flower flowers garden field grass snow rain cloud clouds smoke fire water glass metal
stone brick wall door window room chair car train ship boat plane bird fish horse face eyes hair smile
smiling looking side front back left right top bottom small large big tiny huge old young new simple
detailed high quality sharp soft blurry cinematic dramatic lighting texture pattern background foreground
trigger sks ohwx token style subject flight suit flag american tabby latte launching trail deep distant
full""".split()


def _tiny_corpus() -> list[str]:
    words = _WORDS
    sentences = []
    for i in range(len(words)):
        sentences.append(" ".join(words[(i * k) % len(words)] for k in range(1, 12)))
        sentences.append(f"a photo of a {words[i]} with {words[(i * 7) % len(words)]} in the {words[(i * 3) % len(words)]}")
    return sentences


def build_tiny_tokenizer():
    """A T5 tokenizer whose unigram vocabulary is trained here with sentencepiece.

    transformers 5 ignores ``vocab_file=`` for T5 (it silently yields a 4-token
    vocabulary), so the trained (piece, score) list is passed as ``vocab=``.
    """
    import sentencepiece as spm
    from transformers import T5Tokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_tiny_corpus()),
        model_writer=model,
        vocab_size=400,
        hard_vocab_limit=False,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=MAX_TOKENS)
    if len(tokenizer) <= 4:
        raise RuntimeError("the tiny tokenizer came out with no vocabulary")
    return tokenizer


def tiny_transformer_config(layers: int = 2, heads: int = 2, head_dim: int = 16, caption_channels: int = 32) -> dict[str, Any]:
    config = dict(XL2_TRANSFORMER_CONFIG)
    config.update(
        num_layers=layers,
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        cross_attention_dim=heads * head_dim,
        caption_channels=caption_channels,
        # sample_size 32 makes the pipeline's resolution binning use the 256 px table.
        sample_size=32,
        interpolation_scale=INTERPOLATION_SCALE[256],
    )
    return config


def build_tiny_pipeline(seed: int = 0, family: str = "sigma"):
    """A complete PixArt-Sigma pipeline of a few hundred kB: random text encoder and
    transformer, and a VAE that reconstructs colours and coarse shapes (:func:`build_tiny_vae`).

    ``family="alpha"``: a PixArt-alpha pipeline instead, as PixArt-XL-2-1024-MS is
    made: 120 T5 tokens, the SD VAE's scaling factor, and a transformer of
    ``sample_size`` 128 that takes the resolution and aspect-ratio micro-conditions
    (its width 48, so the size embedder can split it in three).
    """
    import diffusers
    from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from pixart_tune.family import family_named

    kind = family_named(family)
    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
    tokenizer.model_max_length = kind.max_tokens
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    vae = build_tiny_vae(seed, scaling_factor=kind.vae_scaling_factor)
    config = tiny_transformer_config(caption_channels=32)
    if family == "alpha":
        # As PixArt-alpha's configs: neither interpolation_scale nor use_additional_conditions
        # is written, so diffusers' defaults apply (conditions on at sample_size 128).
        config.update(sample_size=128, attention_head_dim=24, cross_attention_dim=48)
        config.pop("interpolation_scale")
        config.pop("use_additional_conditions")
    transformer = PixArtTransformer2DModel.from_config(config)
    # PixArt-Sigma's scheduler (DPM-Solver++ over linear DDPM betas, epsilon
    # prediction) with a shorter schedule: betas up to TINY_BETA_END, not 0.02.
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.0001, beta_end=TINY_BETA_END, beta_schedule="linear", num_train_timesteps=1000, prediction_type="epsilon"
    )
    return getattr(diffusers, kind.pipeline)(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


@dataclasses.dataclass
class TinyConfig:
    """What ``pixart-tune init-tiny`` writes."""

    out: str
    """Folder to create (it must not exist, or be empty)."""
    seed: int = 0
    """Seed of the random weights."""
    family: Literal["sigma", "alpha"] = "sigma"
    """sigma: a tiny PixArt-Sigma pipeline; alpha: a tiny PixArt-alpha one (120 tokens,
    the SD VAE's scaling, resolution and aspect-ratio micro-conditions)."""


def init_tiny(out: str | Path, seed: int = 0, family: str = "sigma") -> Path:
    """Writes the tiny pipeline to ``out`` in the diffusers folder layout."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a folder; choose a new folder")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder or remove it")
    build_tiny_pipeline(seed, family).save_pretrained(out, safe_serialization=True)
    return out
