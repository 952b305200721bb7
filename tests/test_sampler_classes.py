"""Prior-preservation draws in the batch sampler: ratio, rounds over the class set, even mixing."""

from __future__ import annotations

from collections import Counter

from pixart_tune.training.sampler import BucketBatchSampler, class_draw, interleave

SQUARE, WIDE = (256, 256), (192, 320)


def test_class_draws_use_every_image_once_per_round_in_a_new_order():
    items = list(range(10, 17))
    rounds = [[class_draw(3, items, number)[0] for number in range(r * 7, (r + 1) * 7)] for r in range(3)]
    assert all(sorted(draws) == items for draws in rounds)
    assert rounds[0] != rounds[1] or rounds[1] != rounds[2], "every round in the same order"
    assert class_draw(3, items, 9) == class_draw(3, items, 9)


def test_interleave_spreads_each_list_evenly():
    merged = interleave(["s1", "s2"], ["c1", "c2", "c3", "c4"])
    assert merged == ["c1", "s1", "c2", "c3", "s2", "c4"]
    assert interleave([1, 2, 3], []) == [1, 2, 3]


def test_an_epoch_holds_class_samples_at_the_ratio_and_mixes_them_into_batches():
    # Items 0-3: subject, all square; items 4-11: class, square.
    buckets = [SQUARE] * 12
    sampler = BucketBatchSampler(buckets, batch_size=2, seed=1, class_items=range(4, 12), class_ratio=1.0)
    batches = sampler.epoch_batches(0)
    kinds = [tuple(sorted(index >= 4 for index in batch)) for batch in batches]
    assert Counter(kinds) == Counter({(False, True): 4}), "each batch: one subject image, one class image"
    # Two epochs draw all 8 class images once each.
    drawn = [i for epoch in (0, 1) for batch in sampler.epoch_batches(epoch) for i in batch if i >= 4]
    assert sorted(drawn) == list(range(4, 12))


def test_ratio_two_and_repeats_count_every_other_sample():
    buckets = [SQUARE, WIDE, SQUARE, WIDE, SQUARE]
    sampler = BucketBatchSampler(buckets, batch_size=1, seed=0, repeats=[3, 3, 1, 1, 1], class_items=[2, 3, 4], class_ratio=2.0)
    draws = [i for batch in sampler.epoch_batches(0) for i in batch]
    assert sampler.class_per_epoch == 12 and len(draws) == 18
    assert Counter(i for i in draws if i < 2) == Counter({0: 3, 1: 3})
    assert Counter(i for i in draws if i >= 2) == Counter({2: 4, 3: 4, 4: 4})


def test_without_class_items_the_order_is_unchanged():
    buckets = [SQUARE, WIDE, SQUARE, WIDE, SQUARE, SQUARE]
    plain = BucketBatchSampler(buckets, batch_size=2, seed=5)
    assert plain.epoch_batches(3) == BucketBatchSampler(buckets, batch_size=2, seed=5, class_items=()).epoch_batches(3)


def test_class_items_with_caption_variants_take_turns_by_round():
    buckets = [SQUARE, SQUARE, SQUARE]
    sampler = BucketBatchSampler(buckets, batch_size=1, seed=2, variants=[1, 2, 1], class_items=[1, 2])
    seen = [draw for epoch in range(4) for batch in sampler.epoch_batches(epoch) for draw in batch if isinstance(draw, tuple)]
    assert sorted(variant for _, variant in seen) == [0, 1], "item 1's two captions, one per round"
