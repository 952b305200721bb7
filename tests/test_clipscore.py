"""CLIP score on a tiny CLIP: torchmetrics' definition, by hand, and the errors a recipe can meet."""

from __future__ import annotations

import pytest
import torch

from pixart_tune.errors import UserError
from pixart_tune.training.clipscore import ClipScorer
from tests.clip_fixtures import CLIP_WORDS, MAX_TEXT_TOKENS, tiny_clip  # noqa: F401  (fixture)
from tests.prepare_fixtures import photo

PROMPTS = ["a photo of a red cat", "a small blue house in the tree", "the big dog on the sky"]


@pytest.fixture(scope="module")
def images():
    return [photo(48, 40, seed) for seed in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def scorer(tiny_clip):  # noqa: F811
    return ClipScorer(tiny_clip, "cpu")


def by_hand(folder: str, images, prompts) -> list[float]:
    """100 * max(cos, 0) from the model's own feature functions, normalised here."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        image = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).pooler_output
    image, text = image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)
    return [100 * max(float(i @ t), 0.0) for i, t in zip(image, text)]


def test_scores_are_torchmetrics_clip_scores(scorer, tiny_clip, images):  # noqa: F811
    scores = scorer.score(images, PROMPTS)
    assert len(scores) == len(PROMPTS) and all(0.0 <= s <= 100.0 for s in scores)
    assert scores == pytest.approx(by_hand(tiny_clip, images, PROMPTS), abs=1e-4)
    assert any(s > 0 for s in scores), "every pair clamped to 0: the test shows nothing"


def test_scores_are_deterministic(scorer, tiny_clip, images):  # noqa: F811
    assert scorer.score(images, PROMPTS) == scorer.score(images, PROMPTS) == ClipScorer(tiny_clip, "cpu").score(images, PROMPTS)
    # One pair alone scores as it does in a batch (the padding of the other prompts is masked).
    assert scorer.score(images[1:2], PROMPTS[1:2])[0] == pytest.approx(scorer.score(images, PROMPTS)[1], abs=1e-4)


def test_the_prompt_changes_the_score(scorer, images):
    scores = [scorer.score(images[:1], [prompt])[0] for prompt in ("a photo of a red cat", "green noise", "a flat colour", "the sky")]
    assert len(set(scores)) > 1


def test_long_prompts_are_cut_at_the_models_length(scorer, images):
    # Past the model's MAX_TEXT_TOKENS positions nothing counts: two long prompts that
    # differ only there score alike (each word is at least one token).
    start = " ".join((CLIP_WORDS * 2)[:MAX_TEXT_TOKENS])
    one, other = f"{start} red cat on the sky", f"{start} big blue house with a tree"
    assert scorer.score(images[:2], [one, one]) == pytest.approx(scorer.score(images[:2], [other, other]), abs=1e-5)
    assert scorer.score(images[:1], [one]) != pytest.approx(scorer.score(images[:1], [start[:20]]), abs=1e-5)


def test_close_frees_and_a_later_score_loads_again(tiny_clip, images):  # noqa: F811
    scorer = ClipScorer(tiny_clip, "cpu")
    first = scorer.score(images[:1], PROMPTS[:1])
    scorer.close()
    assert not scorer.loaded
    assert scorer.to("cpu").score(images[:1], PROMPTS[:1]) == first


def test_mismatched_lists_and_empty_ones(scorer, images):
    assert scorer.score([], []) == []
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        scorer.score(images[:2], PROMPTS[:1])


def test_a_missing_folder_names_the_setting(tmp_path):
    with pytest.raises(UserError, match="validation.clip_model"):
        ClipScorer(str(tmp_path / "no-such-clip"), "cpu")


def test_an_uncached_hub_model_names_the_setting():
    # Tests run offline (conftest): a hub id not in the cache cannot be had.
    with pytest.raises(UserError, match="validation.clip_model"):
        ClipScorer("nobody-here/no-such-clip", "cpu")


def test_a_model_that_is_not_clip_names_the_setting(tmp_path, images):
    from transformers import T5Config

    T5Config(d_model=8, num_layers=1).save_pretrained(tmp_path / "t5")
    scorer = ClipScorer(str(tmp_path / "t5"), "cpu")  # a folder with a model: accepted, refused when it loads
    with pytest.raises(UserError, match="validation.clip_model .*t5 model, not CLIP"):
        scorer.score(images[:1], PROMPTS[:1])


def test_a_folder_without_a_model_names_the_setting(tmp_path, images):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="validation.clip_model"):
        ClipScorer(str(tmp_path / "empty"), "cpu").score(images[:1], PROMPTS[:1])


# --- through the trainer's Validator -------------------------------------------------------

VALIDATION_PROMPTS = ["a photo of a red cat", "green noise"]
VALIDATION_SEEDS = [0, 1]


def make_validator(model: str, clip_model: str | None):
    """A Validator around the tiny transformer with a LoRA that changes its images, drawing 64 px images in 2 steps."""
    from pixart_tune.adapters.lora import LoraSettings, inject_lora, lora_layers
    from pixart_tune.base import MAX_TOKENS
    from pixart_tune.models import load_transformer
    from pixart_tune.training.config import ValidationSection
    from pixart_tune.training.validation import Validator, encode_prompts

    config = ValidationSection(every=1, prompts=VALIDATION_PROMPTS, seeds=VALIDATION_SEEDS, steps=2, height=64, width=64,
                               clip_model=clip_model)
    transformer = inject_lora(load_transformer(model), LoraSettings(rank=4, targets="all_linear"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers(transformer).values():
            weight = layer.lora_B["default"].weight
            weight.copy_(0.5 * torch.randn(weight.shape, generator=generator))
    cpu = torch.device("cpu")
    empty_embeds, empty_mask = encode_prompts(model, [""], cpu, MAX_TOKENS)
    return Validator(config, model, transformer, cpu, torch.float32, prompts=encode_prompts(model, config.prompts, cpu, MAX_TOKENS),
                     resolution=256, negative=(empty_embeds[0], empty_mask[0]))


def test_validation_scores_the_model_every_time_and_the_base_once(tiny_model, tiny_clip):  # noqa: F811
    validator = make_validator(tiny_model, tiny_clip)
    assert not validator.clip.loaded, "CLIP loads at the first validation, not with the trainer"
    grid, base = validator.grids()
    assert grid is not None and base is not None
    scores = validator.last_scores
    assert set(scores) == {"validation/clip_score", "validation/clip_score_0", "validation/clip_score_1", "validation/clip_score_base"}
    assert all(0.0 <= value <= 100.0 for value in scores.values())
    # The model's images (the last drawn), each against its own prompt, seed by seed within a prompt.
    expected = ClipScorer(tiny_clip, "cpu").score(validator.last_images, [p for p in VALIDATION_PROMPTS for _ in VALIDATION_SEEDS])
    assert scores["validation/clip_score_0"] == pytest.approx(sum(expected[:2]) / 2, abs=1e-4)
    assert scores["validation/clip_score_1"] == pytest.approx(sum(expected[2:]) / 2, abs=1e-4)
    assert scores["validation/clip_score"] == pytest.approx(sum(expected) / 4, abs=1e-4)
    assert scores["validation/clip_score_base"] != pytest.approx(scores["validation/clip_score"], abs=1e-4), "the LoRA changed nothing"
    assert validator.clip.loaded and next(validator.clip._model.parameters()).device.type == "cpu"

    validator.grids()
    assert "validation/clip_score_base" not in validator.last_scores
    assert validator.last_scores["validation/clip_score"] == pytest.approx(scores["validation/clip_score"], abs=1e-4)
    validator.close()
    assert not validator.clip.loaded


def test_validation_without_a_clip_model_scores_nothing(tiny_model):
    validator = make_validator(tiny_model, None)
    validator.grids()
    assert validator.clip is None and validator.last_scores == {}
    assert len(validator.last_images) == len(VALIDATION_PROMPTS) * len(VALIDATION_SEEDS)


def test_a_misspelt_clip_model_fails_when_validation_is_set_up(tiny_model, tmp_path):
    with pytest.raises(UserError, match="validation.clip_model"):
        make_validator(tiny_model, str(tmp_path / "no-such-clip"))
