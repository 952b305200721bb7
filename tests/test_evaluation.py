"""The held-out loss: same images, same noise, same timesteps, so it moves only when the model does."""

from __future__ import annotations

import random

import pytest
import torch

from pixart_tune.data.cache import CacheItem, content_key
from pixart_tune.models import load_noise_scheduler, load_transformer
from pixart_tune.training import diffusion
from pixart_tune.training.config import EvaluationSection
from pixart_tune.training.dataset import CachedDataset
from pixart_tune.training.diffusion import per_sample_mse
from pixart_tune.training.evaluation import Evaluator, eval_noise, plan_pairs, split_held_out
from tests.training_fixtures import red_dataset  # noqa: F401  (fixture)

SETTINGS = EvaluationSection(timesteps=[100, 500, 900], seed=0)
NO_MICRO_CONDITIONS = {"resolution": None, "aspect_ratio": None}


def items(count: int) -> list[CacheItem]:
    return [
        CacheItem(source=f"img_{i}.png", captions=(f"caption {i}",), bucket=(256, 256), latent_key=content_key(f"image {i}"), text_keys=(f"t{i}",))
        for i in range(count)
    ]


def held_keys(all_items: list[CacheItem], fraction: float) -> set[str]:
    return {all_items[i].latent_key for i in split_held_out(all_items, fraction)[1]}


def test_the_held_out_images_do_not_depend_on_the_order():
    dataset = items(40)
    expected = held_keys(dataset, 0.2)
    assert len(expected) == 8
    shuffled = list(dataset)
    random.Random(1).shuffle(shuffled)
    assert held_keys(shuffled, 0.2) == expected
    # Each image's rank is its own: with more images, the old ones held out are still the lowest ranked of them.
    bigger = held_keys(items(100), 0.2) & {item.latent_key for item in dataset}
    assert bigger <= expected or expected <= bigger


def test_the_split_covers_every_item_once():
    train, held = split_held_out(items(10), 0.3)
    assert sorted(train + held) == list(range(10))
    assert len(held) == 3 and train == sorted(train) and held == sorted(held)


def test_a_small_fraction_holds_out_one_and_none_holds_out_nothing():
    assert len(split_held_out(items(2), 0.01)[1]) == 1
    assert split_held_out(items(5), 0.0) == ([0, 1, 2, 3, 4], [])


@pytest.mark.parametrize("count, fraction", [(1, 0.1), (2, 0.9), (10, 0.99)])
def test_holding_out_everything_is_refused(count, fraction):
    with pytest.raises(ValueError, match="data.eval_fraction"):
        split_held_out(items(count), fraction)


def test_the_noise_is_fixed_by_seed_image_and_timestep():
    noise = eval_noise("key", (4, 8, 8), 0, 100)
    assert noise.device.type == "cpu" and noise.dtype == torch.float32
    assert torch.equal(noise, eval_noise("key", (4, 8, 8), 0, 100))
    for other in (eval_noise("key", (4, 8, 8), 1, 100), eval_noise("other", (4, 8, 8), 0, 100), eval_noise("key", (4, 8, 8), 0, 101)):
        assert not torch.equal(noise, other)


def test_a_batch_holds_one_bucket():
    batches = plan_pairs([(256, 256), (320, 192), (256, 256)], [0, 1, 2], [10, 20], batch_size=3)
    assert batches == [[(0, 10), (0, 20), (2, 10)], [(2, 20)], [(1, 10), (1, 20)]]


@pytest.fixture(scope="module")
def model(tiny_model):
    torch.manual_seed(0)
    return load_transformer(tiny_model).eval(), load_noise_scheduler(tiny_model)


def loss_of(transformer, scheduler):
    """The trainer's forward with unweighted MSE: the loss an evaluation is made of."""

    def loss_fn(latents, noise, timesteps, embeds, mask):
        noisy = diffusion.add_noise(scheduler, latents, noise, timesteps)
        output = transformer(
            noisy, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=timesteps,
            added_cond_kwargs=NO_MICRO_CONDITIONS, return_dict=False,
        )[0]
        return per_sample_mse(output, noise)

    return loss_fn


def evaluate(data, model, settings=SETTINGS, batch_size=2) -> dict[str, float]:
    transformer, scheduler = model
    evaluator = Evaluator(CachedDataset(data), None, settings, scheduler.config.num_train_timesteps, batch_size=batch_size)
    return evaluator.evaluate(loss_of(transformer, scheduler), "cpu", torch.float32)


def test_two_evaluators_give_the_same_numbers(red_dataset, model):  # noqa: F811
    first = evaluate(red_dataset, model)
    assert set(first) == {"eval/loss", "eval/loss_t100", "eval/loss_t500", "eval/loss_t900"}
    assert first == evaluate(red_dataset, model)
    per_timestep = [first[f"eval/loss_t{t}"] for t in SETTINGS.timesteps]
    assert first["eval/loss"] == pytest.approx(sum(per_timestep) / len(per_timestep))
    # The batch only groups the pairs: the numbers are those of one pair at a time.
    alone = evaluate(red_dataset, model, batch_size=1)
    assert all(alone[k] == pytest.approx(v, rel=1e-5) for k, v in first.items())


def test_another_seed_gives_other_numbers(red_dataset, model):  # noqa: F811
    reseeded = evaluate(red_dataset, model, EvaluationSection(timesteps=SETTINGS.timesteps, seed=1))
    assert reseeded["eval/loss"] != evaluate(red_dataset, model)["eval/loss"]


def test_a_changed_model_gives_another_number(red_dataset, model):  # noqa: F811
    transformer, _ = model
    before = evaluate(red_dataset, model)
    weight = transformer.proj_out.weight
    original = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.add_(0.05 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
        after = evaluate(red_dataset, model)
    finally:
        with torch.no_grad():
            weight.copy_(original)
    assert after["eval/loss"] != before["eval/loss"]
    assert evaluate(red_dataset, model) == before


def test_held_out_items_only_and_the_first_caption(red_dataset):  # noqa: F811
    dataset = CachedDataset(red_dataset)
    evaluator = Evaluator(dataset, [1], SETTINGS, 1000, batch_size=3)
    assert len(evaluator) == 3
    batch, noise, timesteps = next(evaluator.inputs())
    key = dataset.manifest.items[1].latent_key
    assert torch.equal(batch.latents[0], dataset[1]["latent"])
    assert torch.equal(batch.embeds[0], dataset[(1, 0)]["embeds"])
    assert torch.equal(noise[2], eval_noise(key, noise.shape[1:], SETTINGS.seed, 900))
    assert timesteps.tolist() == [100, 500, 900]


def test_timesteps_outside_the_schedule_are_refused(red_dataset):  # noqa: F811
    with pytest.raises(ValueError, match="evaluation.timesteps"):
        Evaluator(CachedDataset(red_dataset), None, EvaluationSection(timesteps=[100, 1000]), 1000)


def test_a_loss_per_batch_instead_of_per_sample_is_refused(red_dataset):  # noqa: F811
    evaluator = Evaluator(CachedDataset(red_dataset), None, SETTINGS, 1000, batch_size=2)
    with pytest.raises(ValueError, match="one value per sample"):
        evaluator.evaluate(lambda latents, *rest: latents.mean(), "cpu", torch.float32)
