"""Caption variants: several captions per image, each encoded once by prepare, one drawn each time training sees the image."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from pixart_tune.commands.prepare import main as cli
from pixart_tune.data.cache import FeatureCache, content_key
from pixart_tune.data.captions import clean, compose
from pixart_tune.data.prepare import PrepareConfig, prepare_dataset, summary
from pixart_tune.data.sources import pick_caption, pick_captions
from pixart_tune.errors import UserError
from pixart_tune.training.dataset import BucketBatchSampler, TrainingSet, choose_variant
from pixart_tune.training.trainer import Trainer, dataset_fingerprint, run
from tests.prepare_fixtures import encode, photo, write
from tests.training_fixtures import assert_same_adapter, interrupt_then_resume, red_dataset, tiny_config  # noqa: F401  (fixture)

LONG = "a red fox standing in deep snow at the edge of a pine forest, soft morning light"
# Windows line ends, a blank line, the long line again with other spacing, and a line
# that only equals another once the trigger is put first: three captions in the end.
FOX = "\r\n".join([LONG, "", "a fox", f"  {LONG.replace(', ', ',   ')} ", "a fox, close-up", "sks, a fox", ""])
OVERLONG = " ".join(["a blue house with a red door"] * 60)
FOX_CAPTIONS = (f"sks, {LONG}", "sks, a fox", "sks, a fox, close-up")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """fox: three captions in its sidecar; tree: one; house (portrait): two, the second over 300 tokens."""
    src = tmp_path_factory.mktemp("variants") / "src"
    write(src / "fox.png", encode(photo(256, 256, 1), "PNG"))
    write(src / "fox.txt", FOX.encode())
    write(src / "tree.png", encode(photo(256, 256, 2), "PNG"))
    write(src / "tree.txt", b"a tree on a hill\n")
    write(src / "house.png", encode(photo(192, 320, 3), "PNG"))
    write(src / "house.txt", f"a blue house\n{OVERLONG}\n".encode())
    return src


def _prepare(model: str, src: Path, out: Path, **options) -> dict:
    return prepare_dataset(PrepareConfig(source=str(src), out=str(out), model=model, resolution=256, progress=False, **options))


@pytest.fixture(scope="module")
def prepared(tiny_model, source) -> dict:
    out = source.parent / "prepared"
    return {"out": out, "report": _prepare(tiny_model, source, out, trigger="sks", caption_variants=True)}


def _items(out: Path) -> dict:
    return {item.source: item for item in FeatureCache(out).read_manifest().items}


# --- prepare -----------------------------------------------------------------------


def test_each_sidecar_line_is_a_caption_encoded_as_the_pipeline_encodes_it(prepared, tiny_model):
    from diffusers import PixArtSigmaPipeline

    items = _items(prepared["out"])
    assert items["fox.png"].captions == FOX_CAPTIONS
    assert items["tree.png"].captions == ("sks, a tree on a hill",)
    assert items["house.png"].captions == ("sks, a blue house", f"sks, {OVERLONG}")
    assert len({key for item in items.values() for key in item.text_keys}) == 6

    cache = FeatureCache(prepared["out"])
    pipe = PixArtSigmaPipeline.from_pretrained(tiny_model)
    for item in items.values():
        for caption, key in zip(item.captions, item.text_keys):
            with torch.no_grad():
                embeds, mask, _, _ = pipe.encode_prompt(caption, do_classifier_free_guidance=False, device="cpu")
            cached, cached_mask = cache.read_text(key, 300)
            assert torch.equal(cached_mask, mask[0].long()), caption
            torch.testing.assert_close(cached[mask[0].bool()], embeds[0][mask[0].bool()], atol=1e-5, rtol=1e-4)

    report = prepared["report"]
    counts = report["counts"]
    assert (counts["images_with_variants"], counts["captions"], counts["texts_encoded"]) == (2, 6, 7)  # + the empty prompt
    accepted = {a["source"]: a for a in report["accepted"]}
    assert accepted["fox.png"]["captions"] == list(FOX_CAPTIONS) and accepted["fox.png"]["caption"] == FOX_CAPTIONS[0]
    # Every variant is counted in tokens; the overlong one is named by its place.
    assert [(o["source"], o["variant"], o["variants"]) for o in report["overlong_captions"]] == [("house.png", 1, 2)]
    text = summary(report, str(prepared["out"]))
    assert "caption variants: 2 images have several captions; 6 captions in all" in text
    assert "house.png: " in text and "(caption 2 of 2)" in text


def test_without_the_option_a_sidecar_is_one_caption_as_before(tiny_model, source, prepared, tmp_path):
    report = _prepare(tiny_model, source, tmp_path / "out", trigger="sks")
    items = _items(tmp_path / "out")
    assert items["fox.png"].captions == (compose(clean(FOX), "sks"),)
    assert all(len(item.captions) == 1 for item in items.values())
    # The same caption gets the same content key as in the variants run.
    assert items["tree.png"].text_keys == _items(prepared["out"])["tree.png"].text_keys
    assert report["counts"]["images_with_variants"] == 0 and report["counts"]["images_with_unused_variants"] == 2
    assert [o["source"] for o in report["overlong_captions"]] == ["house.png"] and "variant" not in report["overlong_captions"][0]
    assert "2 images have several captions (sidecar lines joined into one" in summary(report, str(tmp_path / "out"))


def test_rerun_reuses_every_variant_and_old_manifests_still_read(prepared, tiny_model, source, tmp_path, capsys):
    out = tmp_path / "again"
    shutil.copytree(prepared["out"], out)
    # the command line's --caption-variants, over the same folder: nothing to encode
    cli([str(source), "--out", str(out), "--model", tiny_model, "--resolution", "256", "--trigger", "sks", "--caption-variants", "--no-progress"])
    assert "caption variants: 2 images have several captions" in capsys.readouterr().out
    again = json.loads((out / "report.json").read_text())
    assert (again["counts"]["texts_encoded"], again["counts"]["texts_reused"], again["counts"]["latents_encoded"]) == (0, 7, 0)
    assert _items(out) == _items(prepared["out"])

    # A manifest written before variants (format 1: one caption and text_key per item) reads as one caption each.
    data = json.loads((out / "dataset.json").read_text())
    assert data["format"] == 2
    for item in data["items"]:
        item["caption"], item["text_key"] = item.pop("captions")[0], item.pop("text_keys")[0]
    (out / "dataset.json").write_text(json.dumps(dict(data, format=1)))
    old = _items(out)
    assert old["fox.png"].captions == FOX_CAPTIONS[:1] and old["fox.png"].text_key == _items(prepared["out"])["fox.png"].text_keys[0]
    assert TrainingSet([(out, 1)]).variants == [1, 1, 1]
    (out / "dataset.json").write_text(json.dumps(dict(data, format=99)))
    with pytest.raises(UserError, match="cache format 99, this version reads 1 or 2; re-run prepare"):
        FeatureCache(out).read_manifest()


def test_a_list_valued_metadata_column_gives_one_caption_per_string(tiny_model, tmp_path):
    src = tmp_path / "src"
    write(src / "a.png", encode(photo(256, 256, 4), "PNG"))
    write(src / "b.png", encode(photo(256, 256, 5), "PNG"))
    rows = [{"file_name": "a.png", "text": ["a cat", "a small  cat on a tree", "a cat", 7]}, {"file_name": "b.png", "text": "a dog"}]
    write(src / "metadata.jsonl", "\n".join(json.dumps(r) for r in rows).encode())

    _prepare(tiny_model, src, tmp_path / "on", caption_variants=True)
    items = _items(tmp_path / "on")
    assert items["a.png"].captions == ("a cat", "a small cat on a tree") and items["b.png"].captions == ("a dog",)
    # Without the option a list gives its first string (with the column named), as before.
    report = _prepare(tiny_model, src, tmp_path / "off", caption_column="text")
    assert [a["caption"] for a in report["accepted"]] == ["a cat", "a dog"]
    assert report["caption_sources"] == {"metadata": 2} and report["counts"]["images_with_unused_variants"] == 1

    assert pick_captions({"captions": ["x", None, "y"]}, None) == ("x", "y")  # COCO-style list column, found by default
    assert pick_caption({"captions": ["x", "y"]}, None) is None  # unchanged without variants
    assert pick_captions({"caption": "one"}, None) == ("one",) and pick_captions({"text": 3}, "text") == ()


# --- training ----------------------------------------------------------------------


def test_draws_cycle_through_every_variant_deterministically():
    buckets = [(256, 256)] * 3 + [(320, 192)]
    variants, repeats = [3, 1, 2, 1], [1, 1, 2, 1]
    sampler = BucketBatchSampler(buckets, batch_size=2, seed=5, repeats=repeats, variants=variants)
    plain = BucketBatchSampler(buckets, batch_size=2, seed=5, repeats=repeats)
    drawn = defaultdict(list)
    for epoch in range(6):
        batches = sampler.epoch_batches(epoch)
        # The order is that of the same data without variants; one-caption items stay plain indices.
        index = lambda draw: draw[0] if isinstance(draw, tuple) else draw  # noqa: E731
        assert [[index(d) for d in b] for b in batches] == plain.epoch_batches(epoch)
        assert {type(d) for b in batches for d in b if index(d) in (1, 3)} == {int}
        assert {type(d) for b in batches for d in b if index(d) in (0, 2)} == {tuple}
        for batch in batches:
            for draw in batch:
                if isinstance(draw, tuple):
                    drawn[draw[0]].append(draw[1])
        # item 2 is listed twice per epoch and has two captions: each epoch trains both
        assert sorted(drawn[2][-2:]) == [0, 1]
    # every round of three draws of item 0 uses each caption once, in orders that change
    rounds = [tuple(drawn[0][i : i + 3]) for i in range(0, 6, 3)]
    assert all(sorted(r) == [0, 1, 2] for r in rounds) and len(set(rounds)) == 2
    assert drawn[0] == [choose_variant(5, 0, draw, 3) for draw in range(6)]
    # A fresh sampler (a new run, a resume, another rank) draws the same; another seed differs.
    again = BucketBatchSampler(buckets, batch_size=2, seed=5, repeats=repeats, variants=variants)
    assert [again.epoch_batches(e) for e in range(6)] == [sampler.epoch_batches(e) for e in range(6)]
    assert [choose_variant(6, 0, d, 3) for d in range(12)] != [choose_variant(5, 0, d, 3) for d in range(12)]
    again.set_epoch(4, start=1)
    assert list(again) == sampler.epoch_batches(4)[1:]
    ranks = [BucketBatchSampler(buckets, 2, seed=5, num_replicas=2, rank=r, repeats=repeats, variants=variants) for r in (0, 1)]
    dealt = [rank.rank_batches(3) for rank in ranks]
    assert [b for pair in zip(*dealt) for b in pair] == sampler.epoch_batches(3)[: 2 * len(dealt[0])]
    with pytest.raises(ValueError, match="at least one caption"):
        BucketBatchSampler(buckets, 2, variants=[1, 0, 1, 1])


def test_a_single_caption_dataset_draws_and_fingerprints_as_before(red_dataset):
    data = TrainingSet([(red_dataset, 1)])
    assert data.variants == [1, 1]
    with_variants = BucketBatchSampler(data.buckets, batch_size=1, seed=3, repeats=data.repeats, variants=data.variants)
    without = BucketBatchSampler(data.buckets, batch_size=1, seed=3, repeats=data.repeats)
    assert [with_variants.epoch_batches(e) for e in range(4)] == [without.epoch_batches(e) for e in range(4)]
    manifest = data.main.manifest
    before = content_key(*sorted(f"{i.latent_key}:{i.text_key}" for i in manifest.items), manifest.empty_text_key)
    assert dataset_fingerprint(data) == before


def test_training_draws_the_variants_and_resumes_exactly(tiny_model, prepared, tmp_path, monkeypatch):
    data = TrainingSet([(prepared["out"], 1)])
    items = data.main.manifest.items
    fox = next(i for i, item in enumerate(items) if item.source == "fox.png")
    cache = FeatureCache(prepared["out"])
    for variant, key in enumerate(items[fox].text_keys):
        assert torch.equal(data[(fox, variant)]["embeds"], cache.read_embeds(key))
    assert torch.equal(data[fox]["embeds"], cache.read_embeds(items[fox].text_keys[0]))
    assert "3 images x 1 = 3 (256 px, 2 with several captions, 6 captions in all)" in data.describe()
    # The fingerprint covers every variant, not the first caption only.
    assert dataset_fingerprint(data) != dataset_fingerprint(TrainingSet([(_first_captions_only(prepared["out"], tmp_path / "first"), 1)]))

    overrides = ["schedule.steps=8", "schedule.grad_accum=2", "lora.dropout=0.1", "data.caption_dropout=0.3",
                 "checkpoint.every=4", "logging.every=4"]
    fed = []
    original_step = Trainer.train_step

    def record(self, batch):
        fed.extend(batch.embeds[i, : int(batch.mask[i].sum())].clone() for i in range(len(batch)))
        return original_step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", record)
    straight = run(tiny_config(tiny_model, prepared["out"], tmp_path / "straight", *overrides), progress=False)
    # 16 micro-batches over 8 epochs: the fox was trained with each of its three captions.
    assert all(any(e.shape == c.shape and torch.equal(e, c) for e in fed) for c in (cache.read_embeds(k) for k in items[fox].text_keys))

    monkeypatch.undo()
    # Step 6 is two optimizer steps past the checkpoint at 4: those two are lost.
    resumed = interrupt_then_resume(tiny_config(tiny_model, prepared["out"], tmp_path / "resumed", *overrides), monkeypatch, at_step=6)
    assert_same_adapter(straight, resumed)


def _first_captions_only(prepared_out: Path, out: Path) -> Path:
    """A copy of a prepared dataset whose items keep their first caption only."""
    shutil.copytree(prepared_out, out)
    data = json.loads((out / "dataset.json").read_text())
    for item in data["items"]:
        item["captions"], item["text_keys"] = item["captions"][:1], item["text_keys"][:1]
    (out / "dataset.json").write_text(json.dumps(data))
    return out
