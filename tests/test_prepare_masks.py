"""Loss masks in ``prepare``: mask files, alpha channels and dataset columns, on real files and the tiny model.

The geometry tests compute what the cached weights must be without prepare's own
code: the crop offset by hand from the bucket, the weights as block means of the
cropped mask.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pixart_tune.commands.prepare import main as cli
from pixart_tune.data.cache import CacheItem, FeatureCache, Manifest
from pixart_tune.data.images import ImageSkip
from pixart_tune.data.masks import load_mask, mask_name_for, mask_to_latent
from pixart_tune.data.prepare import PrepareConfig, bucketed_images, prepare_dataset, summary
from tests.prepare_fixtures import encode, photo, write


def run(src, out, model, **kwargs):
    return prepare_dataset(PrepareConfig(source=str(src), out=str(out), model=model, resolution=256, progress=False, workers=1, **kwargs))


def items(out) -> dict[str, CacheItem]:
    return {item.source: item for item in FeatureCache(out).read_manifest().items}


def left_white(width: int, height: int, columns: int) -> Image.Image:
    """A mask white on its ``columns`` leftmost columns, black elsewhere."""
    array = np.zeros((height, width), np.uint8)
    array[:, :columns] = 255
    return Image.fromarray(array, "L")


def block_means(mask: np.ndarray, top: int, left: int, cells: tuple[int, int], side: int) -> np.ndarray:
    """Mean of each ``side`` x ``side`` block of ``mask`` cropped at (top, left) to ``cells`` blocks: the expected weights."""
    crop = mask[top : top + cells[0] * side, left : left + cells[1] * side].astype(np.float64) / 255
    return crop.reshape(cells[0], side, cells[1], side).mean(axis=(1, 3))


def test_folder_masks_beside_jpg_and_png_images(tmp_path, tiny_model):
    src = tmp_path / "src"
    write(src / "cat.jpg", encode(photo(256, 256, 1), "JPEG"))
    write(src / "cat.mask.png", encode(left_white(256, 256, 128), "PNG"))
    write(src / "dog.png", encode(photo(256, 256, 2), "PNG"))
    write(src / "dog.mask.png", encode(Image.new("L", (256, 256), 255), "PNG"))
    write(src / "plain.png", encode(photo(256, 256, 3), "PNG"))
    write(src / "nested" / "lonely.mask.png", encode(Image.new("L", (256, 256), 255), "PNG"))
    report = run(src, tmp_path / "out", tiny_model)

    assert sorted(a["source"] for a in report["accepted"]) == ["cat.jpg", "dog.png", "plain.png"]
    assert report["skipped"] == [] and report["counts"]["seen"] == 3  # masks are never images
    assert report["masks"] == 2 and report["counts"]["masks_encoded"] == 2
    assert {a["source"]: a["mask"] for a in report["accepted"]} == {"cat.jpg": "cat.mask.png", "dog.png": "dog.mask.png", "plain.png": None}
    assert [i["source"] for i in report["ignored"]] == ["nested/lonely.mask.png"]
    assert "no image beside it" in report["ignored"][0]["reason"]

    found = items(tmp_path / "out")
    assert found["plain.png"].mask_key is None
    cache = FeatureCache(tmp_path / "out")
    cat = cache.read_mask(found["cat.jpg"].mask_key)
    assert cat.dtype == torch.float32 and cat.shape == (1, 32, 32)
    # 256x256 fills its bucket without a crop: each latent cell is 8x8 mask pixels
    assert torch.equal(cat[0, :, :16], torch.ones(32, 16)) and torch.equal(cat[0, :, 16:], torch.zeros(32, 16))
    assert torch.equal(cache.read_mask(found["dog.png"].mask_key), torch.ones(1, 32, 32))
    text = summary(report, str(tmp_path / "out"))
    assert "masks: 2 of 3 images have masks" in text and "nested/lonely.mask.png: a mask with no image beside it" in text
    # an unmasked item is written as before masks existed
    written = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert {i["source"]: "mask_key" in i for i in written["items"]} == {"cat.jpg": True, "dog.png": True, "plain.png": False}


@pytest.mark.parametrize("crop, top", [("center", 6), ("top", 0)])
def test_mask_is_cropped_exactly_like_its_image(tmp_path, tiny_model, crop, top):
    """A 576x428 image goes to the 288x208 bucket at scale 1/2: covering size 288x214, 6 spare rows
    (3 at the top for a centre crop, 0 for a top crop), so 6 or 0 source rows cut; a latent cell is 16x16 source pixels."""
    src = tmp_path / "src"
    write(src / "tall.jpg", encode(photo(576, 428, 4), "JPEG", quality=95))  # big enough for a DCT-reduced decode
    mask = np.zeros((428, 576), np.uint8)
    mask[:170] = 255
    write(src / "tall.mask.png", encode(Image.fromarray(mask, "L"), "PNG"))
    report = run(src, tmp_path / "out", tiny_model, crop=crop)
    assert report["accepted"][0]["bucket"] == [208, 288]
    weights = FeatureCache(tmp_path / "out").read_mask(items(tmp_path / "out")["tall.jpg"].mask_key)[0].numpy()
    assert weights.shape == (26, 36)
    np.testing.assert_allclose(weights, block_means(mask, top, 0, (26, 36), 16), atol=1e-6)
    # by hand: rows [top, 170) are white, 16 rows a cell
    full, part = divmod(170 - top, 16)
    assert (weights[:full] == 1).all() and np.allclose(weights[full], part / 16) and (weights[full + 1 :] == 0).all()


def test_random_crop_takes_the_same_region_from_mask_and_image(tmp_path):
    """With a random crop the image's seed decides the offset: an image that is its own mask must give back its mask."""
    src = tmp_path / "src"
    blocks = np.kron(np.random.default_rng(0).integers(0, 2, (30, 64)), np.ones((10, 10))).astype(np.uint8) * 255
    write(src / "blocks.png", encode(Image.fromarray(blocks, "L").convert("RGB"), "PNG"))
    write(src / "blocks.mask.png", encode(Image.fromarray(blocks, "L"), "PNG"))
    config = PrepareConfig(source=str(src), out=str(tmp_path / "unused"), resolution=256, crop="random", workers=1, progress=False)
    [(_, image)] = list(bucketed_images(config))
    height, width = image.bucket
    pixels = np.asarray(image.pixels.convert("L"), np.float64) / 255
    expected = pixels.reshape(height // 8, 8, width // 8, 8).mean(axis=(1, 3))
    # the image went through Lanczos, the mask through area averaging: equal up to ringing ...
    assert np.abs(image.mask - expected).mean() < 0.01
    # ... while the centre crop's region would be far off
    assert np.abs(mask_to_latent(Image.fromarray(blocks, "L"), image.bucket, "center", 0) - expected).mean() > 0.05


def test_alpha_masks_through_the_command_line(tmp_path, tiny_model, capsys):
    src = tmp_path / "src"
    rgba = np.zeros((256, 256, 4), np.uint8)
    rgba[..., :3] = np.asarray(photo(256, 256, 5))
    rgba[:, :64, 3] = 255  # the left quarter opaque
    write(src / "cutout.png", encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    write(src / "opaque.png", encode(photo(256, 256, 6).convert("RGBA"), "PNG"))  # alpha 255 everywhere: no mask
    write(src / "photo.jpg", encode(photo(256, 256, 7), "JPEG"))
    rgba[..., :3] = np.asarray(photo(256, 256, 8))
    write(src / "both.png", encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    write(src / "both.mask.png", encode(Image.new("L", (256, 256), 255), "PNG"))  # the file wins over alpha
    base = ["--model", tiny_model, "--resolution", "256", "--no-progress", "--workers", "1"]
    assert cli([str(src), "--out", str(tmp_path / "alpha"), "--mask-from-alpha", *base]) == 0
    assert "masks: 2 of 4 images have masks (2 encoded, 0 reused)" in capsys.readouterr().out
    found, cache = items(tmp_path / "alpha"), FeatureCache(tmp_path / "alpha")
    assert found["opaque.png"].mask_key is None and found["photo.jpg"].mask_key is None
    weights = cache.read_mask(found["cutout.png"].mask_key)[0]
    assert torch.equal(weights[:, :8], torch.ones(32, 8)) and torch.equal(weights[:, 8:], torch.zeros(32, 24))
    assert torch.equal(cache.read_mask(found["both.png"].mask_key), torch.ones(1, 32, 32))

    # without the flag, only the file counts
    assert cli([str(src), "--out", str(tmp_path / "files"), *base]) == 0
    assert "masks: 1 of 4 images have masks" in capsys.readouterr().out
    assert items(tmp_path / "files")["cutout.png"].mask_key is None
    # a re-run with the flag decodes nothing for the alpha masks it cached
    assert cli([str(src), "--out", str(tmp_path / "alpha"), "--mask-from-alpha", *base]) == 0
    again = json.loads((tmp_path / "alpha" / "report.json").read_text())
    assert again["counts"]["masks_reused"] == 2 and again["counts"]["masks_encoded"] == 0 and again["counts"]["images_decoded"] == 0


def test_dataset_mask_column(tmp_path, tiny_model):
    import datasets

    half = encode(left_white(256, 256, 128), "PNG")
    rows = {
        "image": [{"bytes": encode(photo(256, 256, i), "PNG"), "path": None} for i in range(3)],
        "mask": [{"bytes": half, "path": None}, None, {"bytes": half, "path": None}],
        "seg": [None, {"bytes": encode(Image.new("L", (256, 256), 255), "PNG"), "path": None}, None],
        "caption": ["first", "second", "third"],
    }
    features = datasets.Features({"mask": datasets.Image(), "image": datasets.Image(), "seg": datasets.Image(), "caption": datasets.Value("string")})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "saved"))

    report = run(tmp_path / "saved", tmp_path / "out", tiny_model)  # "mask" comes first, yet "image" holds the images
    assert [a["caption"] for a in report["accepted"]] == ["first", "second", "third"]
    assert [a["mask"] for a in report["accepted"]] == ["the mask in column 'mask'", None, "the mask in column 'mask'"]
    found = items(tmp_path / "out")
    weights = FeatureCache(tmp_path / "out").read_mask(found["train/0"].mask_key)[0]
    assert torch.equal(weights[:, :16], torch.ones(32, 16)) and torch.equal(weights[:, 16:], torch.zeros(32, 16))

    other = run(tmp_path / "saved", tmp_path / "seg", tiny_model, mask_column="seg")
    assert other["masks"] == 1 and other["accepted"][1]["mask"] == "the mask in column 'seg'"


def test_rerun_reuses_masks_and_a_changed_mask_is_made_again(tmp_path, tiny_model):
    src = tmp_path / "src"
    for name in ("a", "b"):
        write(src / f"{name}.png", encode(photo(256, 256, ord(name)), "PNG"))
        write(src / f"{name}.mask.png", encode(left_white(256, 256, 100), "PNG"))
    out = tmp_path / "out"
    first = run(src, out, tiny_model)
    assert first["counts"]["masks_encoded"] == 1 and first["counts"]["masks_reused"] == 1  # equal masks share an entry
    before = items(out)

    again = run(src, out, tiny_model)
    assert (again["counts"]["masks_encoded"], again["counts"]["masks_reused"], again["counts"]["latents_encoded"]) == (0, 2, 0)
    assert items(out) == before

    write(src / "b.mask.png", encode(left_white(256, 256, 200), "PNG"))
    changed = run(src, out, tiny_model)
    assert (changed["counts"]["masks_encoded"], changed["counts"]["latents_encoded"]) == (1, 0)
    after = items(out)
    assert after["a.png"] == before["a.png"] and after["b.png"].mask_key != before["b.png"].mask_key
    assert after["b.png"].latent_key == before["b.png"].latent_key
    assert float(FeatureCache(out).read_mask(after["b.png"].mask_key)[0, 0, 24]) == 1.0


def test_black_mask_is_kept_and_reported(tmp_path, tiny_model):
    src = tmp_path / "src"
    write(src / "dark.png", encode(photo(256, 256, 1), "PNG"))
    write(src / "dark.mask.png", encode(Image.new("L", (256, 256), 0), "PNG"))
    report = run(src, tmp_path / "out", tiny_model)
    assert report["masks"] == 1 and report["empty_masks"] == ["dark.png"]
    assert "1 masks are black over the whole crop: those images train nothing inside them" in summary(report, str(tmp_path / "out"))
    again = run(src, tmp_path / "out", tiny_model)  # reused, still reported
    assert again["empty_masks"] == ["dark.png"]


@pytest.mark.parametrize(
    "mask, value",
    [
        (Image.new("RGB", (40, 30), (255, 0, 0)), 76),  # luminance of pure red
        (Image.new("P", (40, 30), 3), 255),
        (Image.fromarray(np.full((30, 40), 65535, np.uint16)), 255),  # 16-bit white stays white
        (Image.fromarray(np.full((30, 40), 32896, np.uint16)), 128),
        (Image.new("LA", (40, 30), (255, 0)), 0),  # transparent counts as black
        (Image.new("1", (40, 30), 1), 255),
    ],
    ids=["rgb", "palette", "16-bit white", "16-bit grey", "transparent", "1-bit"],
)
def test_mask_modes_become_greyscale(mask, value):
    if mask.mode == "P":
        mask.putpalette([0, 0, 0] * 3 + [255, 255, 255] + [0, 0, 0] * 252)
    gray = load_mask(encode(mask, "PNG"), "x.mask.png", "x.png", (30, 40))
    assert gray.mode == "L" and gray.getextrema() == (value, value)


def test_bad_masks_name_the_file_and_the_fix():
    wrong = load_mask(encode(Image.new("L", (100, 80)), "PNG"), "cat.mask.png", "cat.jpg", (160, 200))
    assert wrong == ImageSkip("cat.mask.png is 100x80 but cat.jpg is 200x160: save the mask at the image's size")
    cut = load_mask(encode(Image.new("L", (200, 160)), "PNG")[:60], "cat.mask.png", "cat.jpg", (160, 200))
    assert isinstance(cut, ImageSkip) and cut.reason.startswith("cat.mask.png: truncated") and "fix or re-save the mask" in cut.reason
    assert mask_name_for("cat.jpg") == "cat.mask.png" and mask_name_for("cat.png") == "cat.mask.png"


def test_cache_mask_entries_and_old_manifests(tmp_path):
    cache = FeatureCache(tmp_path)
    cache.write_mask("k", torch.full((4, 6), 0.5))
    assert cache.has_mask("k") and cache.mask_path("k").parent.name == "masks"
    assert torch.equal(cache.read_mask("k"), torch.full((1, 4, 6), 0.5))
    for bad in (torch.full((1, 4, 6), 1.5), torch.zeros(2, 4, 6)):
        with pytest.raises(ValueError):
            cache.write_mask("bad", bad)
    item = dict(source="a.png", captions=["a"], bucket=[256, 256], latent_key="l", text_keys=["t"])
    data = Manifest("m", 256, 4, 32, 300, 0.13, "e", []).to_json()
    (tmp_path / "dataset.json").write_text(json.dumps(dict(data, items=[item, dict(item, source="b.png", mask_key="k")])))
    old, masked = cache.read_manifest().items
    assert old.mask_key is None and masked.mask_key == "k"
