"""The tiny pipeline's VAE: SDXL's layout at a fraction of its width, made to reconstruct.

A randomly initialised autoencoder decodes every latent to the same grey noise, so
nothing trained on its latents could be seen in an image. This one starts as an
exact colour autoencoder built by hand (encoder: the mean colour of each 8x8 pixel
block; decoder: upsampling back) and is then fitted for a few seconds on generated
images; its latents are finally standardised to the SDXL VAE's scaling factor, so
the noise schedule meets latents of the scale it was made for.
"""

from __future__ import annotations

import torch

TINY_VAE_FIT_STEPS = 80
"""Optimizer steps fitting the tiny VAE in ``init-tiny`` (about 0.1 s each on one CPU core)."""
_REF = 20.0
"""Size of the constant pair (+REF, -REF) fed into the VAE's last GroupNorms."""
_SILU_SHIFT = 6.0
"""Offset that puts values of [-1, 1] into SiLU's nearly linear range."""


def build_tiny_vae(seed: int = 0, fit_steps: int = TINY_VAE_FIT_STEPS, scaling_factor: float = 0.13025):
    """The tiny pipeline's ``AutoencoderKL``: SDXL's layout (4 latent channels, 8x
    downsampling, scaling factor 0.13025; the SD VAE's 0.18215 for a tiny PixArt-alpha)
    at a fraction of its width.

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
        scaling_factor=scaling_factor,
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
