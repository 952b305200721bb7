"""Files and tiny models that the prepare tests build on disk: every kind of bad image, a tiny BLIP and a tiny Florence-2."""

from __future__ import annotations

import io
import json
import math
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


# Florence-2's task tokens after BART's vocabulary, in the order of the released
# tokenizer: <od>, </od>, <ocr>, </ocr>, 1000 location bins, then the region tokens.
FLORENCE2_TASK_TOKENS = (
    ["<od>", "</od>", "<ocr>", "</ocr>"]
    + [f"<loc_{i}>" for i in range(1000)]
    + ["<cap>", "</cap>", "<ncap>", "</ncap>", "<dcap>", "</dcap>", "<grounding>", "</grounding>", "<seg>", "</seg>", "<sep>"]
    + ["<region_cap>", "</region_cap>", "<region_to_desciption>", "</region_to_desciption>", "<proposal>", "</proposal>"]
    + ["<poly>", "</poly>", "<and>"]
)
# What the processor turns <MORE_DETAILED_CAPTION> into.
FLORENCE2_CAPTION_QUESTION = "Describe with a paragraph what is shown in the image."


def build_tiny_florence2(out: Path) -> Path:
    """A tiny Florence-2 (random weights) with a real processor, saved with save_pretrained in the hub layout.

    Built like ``florence-community/Florence-2-large``: BART's byte-level BPE
    tokenizer (``<s>``, ``<pad>``, ``</s>``, ``<unk>`` first, ``<mask>`` after the
    merges), then the task and location tokens, and ``<image>`` last as the image
    token; a CLIP image processor whose ``image_seq_length`` is the number of image
    features the vision tower gives; and the generation settings Florence-2
    checkpoints ship (3 beams, no repeated trigram, forced ``<s>`` ... ``</s>``).
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import (
        BartTokenizer, CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration, Florence2Processor, GenerationConfig,
    )

    import torch

    out.mkdir(parents=True, exist_ok=True)
    # A byte-level BPE trained here on the words the tests use and the caption question,
    # so that both encode to whole words as they do with the released vocabulary.
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" ".join(WORDS), FLORENCE2_CAPTION_QUESTION], vocab_size=400, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"], show_progress=False)
    bpe_model = json.loads(bpe.to_str())["model"]
    vocab = dict(bpe_model["vocab"])
    for token in ["<mask>", *FLORENCE2_TASK_TOKENS, "<image>"]:
        vocab[token] = len(vocab)
    tokenizer = BartTokenizer(vocab=vocab, merges=[tuple(merge) for merge in bpe_model["merges"]],
                              extra_special_tokens=FLORENCE2_TASK_TOKENS, image_token="<image>")
    if len(tokenizer) != len(vocab) or tokenizer.image_token_id != len(vocab) - 1:
        raise RuntimeError("the tiny Florence-2 tokenizer did not keep its vocabulary")

    # DaViT downsamples by the product of its patch strides; the projector gives one
    # feature per cell of the last grid plus one pooled feature.
    image_size, strides = 64, (4, 2, 2, 2)
    image_seq_length = (image_size // math.prod(strides)) ** 2 + 1
    image_processor = CLIPImageProcessor(
        size={"height": image_size, "width": image_size}, crop_size={"height": image_size, "width": image_size}, do_center_crop=False,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], image_seq_length=image_seq_length,
    )
    parsers = ["ocr", "phrase_grounding", "pure_text", "description_with_bboxes", "description_with_polygons", "polygons", "bboxes",
               "description_with_bboxes_or_polygons"]
    processor = Florence2Processor(image_processor=image_processor, tokenizer=tokenizer, post_processor_config={name: {} for name in parsers})

    # Weights drawn wider than the released 0.02 (vision 0.3, text 0.5), so that the tiny
    # model's captions change with the image.
    torch.manual_seed(0)
    special = dict(bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    config = Florence2Config(
        vision_config=dict(depths=[1, 1, 1, 1], patch_stride=list(strides), embed_dim=[8, 16, 16, 32], num_heads=[1, 1, 2, 2],
                           num_groups=[1, 1, 2, 2], window_size=4, projection_dim=32, initializer_range=0.3),
        # the released vocabulary is padded to a multiple of 64 too
        text_config=dict(vocab_size=math.ceil(len(tokenizer) / 64) * 64, d_model=32, encoder_layers=1, decoder_layers=1,
                         encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=37,
                         max_position_embeddings=64, decoder_start_token_id=tokenizer.eos_token_id, forced_eos_token_id=tokenizer.eos_token_id,
                         init_std=0.5, **special),
        image_token_id=tokenizer.image_token_id,
    )
    model = Florence2ForConditionalGeneration(config)
    # The output layer is tied to the token embeddings. Zero every row but the words':
    # a zero row scores 0 whatever the decoder says while some of the word rows score
    # above it, so the tiny model writes words, never special, location or byte tokens,
    # and the test can read its captions.
    words = WORDS + FLORENCE2_CAPTION_QUESTION.rstrip(".").split()
    silent = torch.ones(config.text_config.vocab_size, dtype=torch.bool)
    silent[[i for token, i in vocab.items() if token.removeprefix("Ġ") in words]] = False
    with torch.no_grad():
        model.get_input_embeddings().weight[silent] = 0
    model.generation_config = GenerationConfig(
        num_beams=3, no_repeat_ngram_size=3, early_stopping=True, decoder_start_token_id=tokenizer.eos_token_id,
        forced_bos_token_id=tokenizer.bos_token_id, forced_eos_token_id=tokenizer.eos_token_id, **special,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
