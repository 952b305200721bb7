"""Loading PixArt-Sigma components, and building the tiny pipeline used offline.

Everything loads through diffusers' and transformers' own ``from_pretrained`` with a
hub id or a local folder in the diffusers layout (``transformer/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``). The tiny pipeline is saved in that
same layout, so tests and the demo exercise exactly the code path of the real model.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from pathlib import Path
from typing import Any

import torch

from pixart_tune.base import INTERPOLATION_SCALE, MAX_TOKENS

logger = logging.getLogger(__name__)

# PixArt-Sigma XL-2 at 1024 px as the official diffusers conversion writes it.
# Used to instantiate the real architecture on the meta device (memory plans,
# benchmarks) without downloading weights. The "-MS" checkpoints have no
# resolution/aspect micro-conditions.
XL2_TRANSFORMER_CONFIG: dict[str, Any] = {
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 28,
    "cross_attention_dim": 1152,
    "attention_bias": True,
    "sample_size": 128,
    "patch_size": 2,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "interpolation_scale": 2,
    "use_additional_conditions": False,
    "caption_channels": 4096,
}

# T5 v1.1 XXL encoder, the text encoder of PixArt-Sigma (4.7B parameters).
T5_XXL_CONFIG: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "feed_forward_proj": "gated-gelu",
    "is_encoder_decoder": False,
}

def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_transformer(model: str, dtype: torch.dtype = torch.float32, **kwargs: Any):
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel.from_pretrained(model, subfolder="transformer", dtype=dtype, **kwargs)


def load_vae(model: str, dtype: torch.dtype = torch.float32):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(model, subfolder="vae", dtype=dtype)


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model, subfolder="tokenizer")


def text_encoder_in_8bit(load_in_8bit: bool, device: torch.device | str) -> bool:
    """Whether T5 really loads in 8-bit: bitsandbytes' int8 matmuls need the CUDA device it runs on."""
    return load_in_8bit and torch.device(device).type == "cuda" and torch.cuda.is_available()


def load_text_encoder(model: str, dtype: torch.dtype = torch.float32, load_in_8bit: bool = False, device: torch.device | str = "cpu"):
    """T5 encoder on ``device``; ``load_in_8bit`` (CUDA + bitsandbytes) roughly halves T5-XXL's 9.5 GB in bf16."""
    from transformers import T5EncoderModel

    device = torch.device(device)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if text_encoder_in_8bit(load_in_8bit, device):
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        # Placed by bitsandbytes on the very device the prompts go to (not the current one).
        kwargs["device_map"] = {"": device.index if device.index is not None else torch.cuda.current_device()}
        return T5EncoderModel.from_pretrained(model, subfolder="text_encoder", **kwargs)
    if load_in_8bit:
        logger.warning("8-bit T5 needs a CUDA device; loading the text encoder in %s on %s instead", dtype, device)
    return T5EncoderModel.from_pretrained(model, subfolder="text_encoder", **kwargs).to(device)


def quiet_loading() -> None:
    """No loading bars from transformers and diffusers: for runs asked to show no progress."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


def load_noise_scheduler(model: str):
    """The DDPM training schedule, built from the model folder's scheduler config."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(model, subfolder="scheduler")


def load_pipeline(model: str, dtype: torch.dtype = torch.float32, transformer=None):
    """The full ``PixArtSigmaPipeline``; pass ``transformer`` to reuse one already loaded."""
    from diffusers import PixArtSigmaPipeline

    kwargs: dict[str, Any] = {"dtype": dtype}
    if transformer is not None:
        kwargs["transformer"] = transformer
    return PixArtSigmaPipeline.from_pretrained(model, **kwargs)


def meta_transformer(config: dict[str, Any] | None = None, dtype: torch.dtype | None = None):
    """The real-size XL-2 architecture on the meta device: shapes without memory."""
    from diffusers import PixArtTransformer2DModel

    with torch.device("meta"):
        model = PixArtTransformer2DModel.from_config(config or XL2_TRANSFORMER_CONFIG)
    if dtype is not None:
        # nn.Module.to, not ModelMixin.to: the latter warns about fp32-only modules
        # even when the model has none (diffusers checks the list for None, not empty).
        torch.nn.Module.to(model, dtype)
    return model


# --- the tiny pipeline -------------------------------------------------------------

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


def build_tiny_pipeline(seed: int = 0):
    """A complete, randomly initialised PixArt-Sigma pipeline of a few hundred kB."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
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
    # Four blocks give the real VAE's 8x downsampling at a fraction of its width.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=256,
        scaling_factor=0.13025,
    )
    transformer = PixArtTransformer2DModel.from_config(tiny_transformer_config(caption_channels=32))
    # The scheduler PixArt-Sigma ships: DPM-Solver++ over the linear DDPM betas.
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000, prediction_type="epsilon"
    )
    return PixArtSigmaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


@dataclasses.dataclass
class TinyConfig:
    """What ``pixart-tune init-tiny`` writes."""

    out: str
    """Folder to create (it must not exist, or be empty)."""
    seed: int = 0
    """Seed of the random weights."""


def init_tiny(out: str | Path, seed: int = 0) -> Path:
    """Writes the tiny pipeline to ``out`` in the diffusers folder layout."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder or remove it")
    build_tiny_pipeline(seed).save_pretrained(out, safe_serialization=True)
    return out
