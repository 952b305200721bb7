"""Files and tiny models that the prepare tests build on disk: every kind of bad image, and a tiny BLIP."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "the", "in", "on", "with", "sky", "tree", "house", "small", "big"]


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth, photo-like RGB image (gradients plus a little noise) that JPEG keeps well."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [
        128 + 100 * np.sin(x / (17 + seed % 7) + seed),
        128 + 100 * np.cos(y / (23 + seed % 5)),
        (x + y) / (width + height) * 255,
    ]
    array = np.stack(channels, -1) + rng.normal(0, 4, (height, width, 3))
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), "RGB")


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A valid small PNG whose header (IHDR) claims ``width`` x ``height``: a decompression bomb's signature."""
    data = bytearray(encode(Image.new("L", (8, 8)), "PNG"))
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def jpeg_with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", exif=exif, quality=95)


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def build_tiny_blip(out: Path) -> Path:
    """A tiny BLIP captioner (random weights) saved with save_pretrained, in the hub layout."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    import torch

    out.mkdir(parents=True, exist_ok=True)
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    # transformers 5 ignores vocab_file= here (as for T5): pass the vocabulary itself.
    vocab = {token: i for i, token in enumerate(special + WORDS + ["[DEC]"])}
    tokenizer = BertTokenizer(vocab=vocab, bos_token="[DEC]")
    if len(tokenizer) != len(vocab):
        raise RuntimeError("the tiny BERT tokenizer came out with no vocabulary")
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    torch.manual_seed(0)
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
            encoder_hidden_size=32, bos_token_id=tokenizer.convert_tokens_to_ids("[DEC]"),
            sep_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id,
        ),
        vision_config=dict(hidden_size=32, image_size=32, patch_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37),
        projection_dim=32,
    )
    model = BlipForConditionalGeneration(config)
    # Random weights would often say [SEP] or [PAD] first; forbid special tokens so the
    # tiny model always writes words and the test can read its captions.
    with torch.no_grad():
        bias = model.text_decoder.cls.predictions.decoder.bias
        bias[: len(special)] = -1e4
        bias[vocab["[DEC]"]] = -1e4
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
