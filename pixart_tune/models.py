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


# The tiny VAE. A randomly initialised autoencoder decodes every latent to the same
# grey noise, so nothing trained on its latents could be seen in an image. This one
# starts as an exact colour autoencoder built by hand (encoder: the mean colour of each
# 8x8 pixel block; decoder: upsampling back) and is then fitted for a few seconds on
# generated images; its latents are finally standardised to the SDXL VAE's scaling
# factor, so the noise schedule meets latents of the scale it was made for.

TINY_VAE_FIT_STEPS = 80
"""Optimizer steps fitting the tiny VAE in ``init-tiny`` (about 0.1 s each on one CPU core)."""
_REF = 20.0
"""Size of the constant pair (+REF, -REF) fed into the VAE's last GroupNorms."""
_SILU_SHIFT = 6.0
"""Offset that puts values of [-1, 1] into SiLU's nearly linear range."""


def build_tiny_vae(seed: int = 0, fit_steps: int = TINY_VAE_FIT_STEPS):
    """The tiny pipeline's ``AutoencoderKL``: SDXL's layout (4 latent channels, 8x
    downsampling, scaling factor 0.13025) at a fraction of its width.

    Its weights are those of :func:`_init_colour_autoencoder`, fitted with
    ``fit_steps`` steps of :func:`_fit_vae` and rescaled by :func:`_standardise_latents`.
    Deterministic from ``seed``: the layers' random initialisation draws from the
    global generator (seeded by the caller) and the fitting from its own.
    """
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        # One group, not four: GroupNorm forgets the mean and scale of each group, and
        # the decoder's last norm sees 8 channels; in groups of 2, a flat image keeps
        # only the sign of each pair's difference (a few dozen colours at most). One
        # group of 8 holds three (x, -x) colour pairs and the (+REF, -REF) pair that
        # pins its statistics. Same layers and sizes, same parameter count.
        norm_num_groups=1,
        sample_size=256,
        scaling_factor=0.13025,
    )
    _init_colour_autoencoder(vae)
    generator = torch.Generator().manual_seed(seed)
    if fit_steps:
        _fit_vae(vae, generator, fit_steps)
    with torch.no_grad():
        _standardise_latents(vae, _synthetic_images(64, 64, generator))
    return vae


def _centre_tap(conv: torch.nn.Conv2d, matrix: torch.Tensor, keep: float) -> None:
    """Sets ``conv`` to apply ``matrix`` [out, in] at its centre tap, plus ``keep`` times its random weights."""
    random = conv.weight * keep
    conv.weight.zero_()
    k = conv.weight.shape[-1] // 2
    conv.weight[:, :, k, k] = matrix
    conv.weight.add_(random)
    if conv.bias is not None:
        conv.bias.zero_()


def _pairs(inputs: list[int], n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in]: output channel 2j is input ``inputs[j]``, channel 2j+1 its negative."""
    matrix = torch.zeros(n_out, n_in)
    for j, i in enumerate(inputs):
        matrix[2 * j, i], matrix[2 * j + 1, i] = 1.0, -1.0
    return matrix


@torch.no_grad()
def _init_colour_autoencoder(vae, keep: float = 0.02) -> None:
    """Weights that make the tiny AutoencoderKL a colour autoencoder before any training.

    The path through the network carries each colour as a pair (x, -x): the encoder
    averages 2x2 blocks at each of its three downsamplings (latent channels 0-2: the
    mean R, G, B of an 8x8 block; channel 3 is left to the fitting), and the decoder
    upsamples by nearest neighbour and a [1 2 1] blur at each stage (bilinear
    interpolation). Residual branches and attention start at zero, so they pass the
    path through unchanged. The only layers that are not residual are the GroupNorms
    before ``conv_out``; a last residual bias adds a pair (+REF, -REF) there, so the
    norm's mean is exactly 0 and its std is REF times a constant up to terms of order
    (x / REF)**2: the norm, with a matching affine weight, then passes the colours
    through almost unchanged. ``keep`` of each layer's random initialisation stays on
    top, so that the fitting can move every weight (exact copies would stay equal).
    """
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    silu_slope = torch.sigmoid(torch.tensor(_SILU_SHIFT)) * (1 + _SILU_SHIFT * torch.sigmoid(torch.tensor(-_SILU_SHIFT)))
    for module in vae.modules():
        if isinstance(module, ResnetBlock2D):
            module.conv2.weight.zero_()
            module.conv2.bias.zero_()
            if module.conv_shortcut is not None:  # 8 -> 16 channels keeps the first 8; 16 -> 8 drops the last 8
                out_channels, in_channels = module.conv_shortcut.weight.shape[:2]
                _centre_tap(module.conv_shortcut, torch.eye(out_channels, in_channels), keep)
        elif isinstance(module, Attention):
            module.to_out[0].weight.zero_()
            module.to_out[0].bias.zero_()
    encoder, decoder = vae.encoder, vae.decoder

    # Encoder: (R, -R, G, -G, B, -B) in channels 0-5, 2x2 means at each downsampling.
    _centre_tap(encoder.conv_in, _pairs([0, 1, 2], 3, encoder.conv_in.out_channels), keep)
    for block in encoder.down_blocks:
        for down in block.downsamplers or []:
            conv = down.conv  # 3x3, stride 2, padded right and bottom: taps [0:2, 0:2] cover a 2x2 block
            random = conv.weight * keep
            conv.weight.zero_()
            conv.bias.zero_()
            conv.weight[:, :, :2, :2] = torch.eye(conv.out_channels)[:, :, None, None] / 4
            conv.weight.add_(random)
    channels = encoder.conv_norm_out.num_channels
    encoder.mid_block.resnets[-1].conv2.bias[-2:] = torch.tensor([_REF, -_REF])
    norm = encoder.conv_norm_out
    norm.weight.zero_()
    norm.bias.zero_()
    norm.weight[:6] = _REF * (2 / channels) ** 0.5  # the group's std: REF * sqrt(2 / channels)
    norm.bias[:6] = _SILU_SHIFT
    # (SiLU(s + x) - SiLU(s - x)) / 2 = x * SiLU'(s) + O(x**3): the shift cancels.
    moments = torch.zeros(2 * vae.config.latent_channels, channels)
    moments[:3] = _pairs([0, 1, 2], 3, channels).T * 0.5 / silu_slope
    _centre_tap(encoder.conv_out, moments, keep)
    encoder.conv_out.bias[vae.config.latent_channels:] = -8.0  # log-variance: a posterior std of 2% of the colour range
    _centre_tap(vae.quant_conv, torch.eye(2 * vae.config.latent_channels), 0.0)

    # Decoder: the latents as pairs (R, -R, G, -G, B, -B, ., ., L3, -L3) at 16 channels;
    # the 16 -> 8 shortcut keeps the colours, and the last bias adds the reference pair.
    _centre_tap(vae.post_quant_conv, torch.eye(vae.config.latent_channels), 0.0)
    spread = _pairs([0, 1, 2, 3], vae.config.latent_channels, 8)
    spread = torch.cat([spread[:6], torch.zeros(2, 4), spread[6:], torch.zeros(decoder.conv_in.out_channels - 10, 4)])
    _centre_tap(decoder.conv_in, spread, keep)
    blur = torch.tensor([1.0, 2.0, 1.0]) / 4
    for block in decoder.up_blocks:
        for up in block.upsamplers or []:
            conv = up.conv  # after a nearest-neighbour 2x upsampling
            random = conv.weight * keep
            conv.weight.zero_()
            conv.bias.zero_()
            conv.weight += torch.eye(conv.out_channels)[:, :, None, None] * (blur[:, None] * blur[None, :])
            conv.weight.add_(random)
    channels = decoder.conv_norm_out.num_channels
    decoder.up_blocks[-1].resnets[-1].conv2.bias[-2:] = torch.tensor([_REF, -_REF])
    norm = decoder.conv_norm_out
    norm.weight.zero_()
    norm.bias.zero_()
    norm.weight[:6] = _REF * (2 / channels) ** 0.5
    norm.bias[:6] = _SILU_SHIFT
    _centre_tap(decoder.conv_out, _pairs([0, 1, 2], 3, channels).T * 0.5 / silu_slope, keep)



def _synthetic_images(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """[count, 3, size, size] in [-1, 1]: photo-like colour fields with a few flat ellipses.

    The fields are sums of smooth random colour grids at every octave, each octave at
    0.55 times the amplitude of the coarser one (natural images fall off about as
    1/frequency), around a random mean colour; up to two ellipses of one colour each
    give hard edges. Drawn from ``generator`` only.
    """
    import torch.nn.functional as F

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator)

    images = torch.zeros(count, 3, size, size)
    cells, amplitude = 2, 1.0
    while cells <= size // 2:
        grid = torch.randn(count, 3, cells, cells, generator=generator)
        images += amplitude * F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False)
        cells, amplitude = cells * 2, amplitude * 0.55
    images -= images.mean(dim=(2, 3), keepdim=True)
    images *= (0.2 + 0.4 * uniform(count, 1, 1, 1)) / images.std(dim=(1, 2, 3), keepdim=True)
    images += (uniform(count, 3, 1, 1) * 2 - 1) * 0.7
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    for _ in range(2):
        cx, cy, rx, ry = uniform(4, count, 1, 1)
        inside = ((x - cx) / (0.1 + 0.3 * rx)) ** 2 + ((y - cy) / (0.1 + 0.3 * ry)) ** 2 < 1
        inside &= uniform(count, 1, 1) < 0.6
        colour = uniform(count, 3, 1, 1) * 2 - 1
        images = torch.where(inside[:, None], colour + 0.1 * images, images)
    return images.clamp(-1, 1)


def _fit_vae(vae, generator: torch.Generator, steps: int, size: int = 64, batch: int = 8, lr: float = 2e-4) -> None:
    """Fits the VAE to reconstruct :func:`_synthetic_images` (L1 loss through the posterior mean, Adam).

    Runs on one CPU thread: small convolutions gain little from more, and a thread
    count fixed here keeps the weights bit-identical from machine to machine.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    vae.train()
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    try:
        for _ in range(steps):
            images = _synthetic_images(batch, size, generator)
            reconstruction = vae.decode(vae.encode(images).latent_dist.mode()).sample
            loss = (reconstruction - images).abs().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
        vae.eval()


def _standardise_latents(vae, images: torch.Tensor) -> None:
    """Rescales the latent space so that latents x ``scaling_factor`` have mean 0 and
    std 1 per channel on ``images``; decoding is unchanged.

    With z' = k (z - m): the mean rows of ``quant_conv`` become k (W z + b - m), its
    log-variance rows shift by 2 log k, and ``post_quant_conv`` takes z' / k + m.
    """
    channels = vae.config.latent_channels
    latents = vae.encode(images).latent_dist.mode()
    mean = latents.mean(dim=(0, 2, 3))
    std = latents.std(dim=(0, 2, 3)).clamp_min(1e-6)
    k = 1.0 / (std * vae.config.scaling_factor)
    quant, post = vae.quant_conv, vae.post_quant_conv
    quant.weight[:channels] *= k[:, None, None, None]
    quant.bias[:channels] = (quant.bias[:channels] - mean) * k
    quant.bias[channels:] += 2 * torch.log(k)
    post.bias += post.weight[:, :, 0, 0] @ mean
    post.weight /= k[None, :, None, None]

def build_tiny_pipeline(seed: int = 0):
    """A complete PixArt-Sigma pipeline of a few hundred kB: random text encoder and
    transformer, and a VAE that reconstructs colours and coarse shapes (:func:`build_tiny_vae`)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
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
    vae = build_tiny_vae(seed)
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
