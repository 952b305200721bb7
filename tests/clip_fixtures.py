"""A tiny CLIP (random weights, real tokenizer and image processor) saved where ClipScorer can load it.

Built offline like the tiny captioners of ``tests/prepare_fixtures.py``: the BPE
merges are written out here for a few words, and the vocabulary is laid out as OpenAI's
CLIP lays out its own (the 256 byte symbols, the same with ``</w>``, the merges,
then the two special tokens), so the real ``CLIPTokenizer`` reads it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.prepare_fixtures import WORDS

CLIP_WORDS = WORDS + ["flat", "colour", "green", "noise", "a", "red", "cat"]
MAX_TEXT_TOKENS = 16
"""The tiny text tower's positions: prompts longer than this are cut."""
IMAGE_SIZE = 32


def clip_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges that build each word left to right, ending in CLIP's ``</w>`` end-of-word suffix.

    Written out rather than trained: the ``tokenizers`` trainer breaks ties between
    equally frequent pairs differently from run to run, and a fixture must be the
    same model every time. Where one word's merge takes a pair another word needed
    first, that word splits into a few tokens, as rare words do in OpenAI's CLIP.
    """
    merges: dict[tuple[str, str], None] = {}
    for word in sorted(set(words)):
        symbols = [*word[:-1], word[-1] + "</w>"]
        built = symbols[0]
        for symbol in symbols[1:]:
            merges[built, symbol] = None
            built += symbol
    return list(merges)


def clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's layout: byte symbols, byte symbols ending a word, one token per merge, the special tokens."""
    from tokenizers import pre_tokenizers

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(merge) for merge in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}


def build_tiny_clip(out: Path, seed: int = 0) -> Path:
    """A tiny CLIP (random weights) with its processor, saved with save_pretrained as a hub CLIP folder is."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    out.mkdir(parents=True, exist_ok=True)
    merges = clip_merges(CLIP_WORDS)
    vocab = clip_vocab(merges)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TEXT_TOKENS)
    if len(tokenizer) != len(vocab) or tokenizer.unk_token_id in tokenizer("a red cat")["input_ids"][1:-1]:
        raise RuntimeError("the tiny CLIP tokenizer did not keep its vocabulary")
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    torch.manual_seed(seed)
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=MAX_TEXT_TOKENS, **special),
        vision_config=dict(image_size=IMAGE_SIZE, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                           num_attention_heads=2),
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    align_towers(model)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def align_towers(model) -> None:
    """Gives image and text embeddings a common part, so their cosines are positive and still differ.

    Random towers point their embeddings in unrelated directions: cosines near 0 of
    either sign, which the score clamps to 0 whatever the prompt. A shared bias on
    both towers' last layer norms and one projection for both add the same vector
    to every embedding (trained CLIPs' embeddings also share a large common part),
    so scores come out positive, around 50, and move with the image and the prompt.
    """
    import torch

    with torch.no_grad():
        model.vision_model.post_layernorm.bias.fill_(1.0)
        model.text_model.final_layer_norm.bias.fill_(1.0)
        model.text_projection.weight.copy_(model.visual_projection.weight)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """Folder of a tiny CLIP model and processor."""
    return str(build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip"))
