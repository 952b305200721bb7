"""The fast paths of prepare: reduced JPEG decoding, the decode threads, the scan index, duplicates across decode scales."""

from __future__ import annotations

import hashlib
import json
import os
import threading

import numpy as np
import pytest
from PIL import Image

from pixart_tune.base import SCAN_INDEX as INDEX
from pixart_tune.data import images
from pixart_tune.data.duplicates import DuplicateFinder
from pixart_tune.data.prepare import PrepareConfig, bucketed_images, prepare_dataset
from pixart_tune.data.stage import Bucketed, needed_size, ordered_map, resolve_workers
from tests.conftest import REPO
from tests.prepare_fixtures import encode, jpeg_with_orientation, photo, write


def needed_at(resolution):
    return lambda h, w: needed_size(h, w, resolution)


# reduced JPEG decoding -----------------------------------------------------------------
def test_big_jpeg_decodes_reduced_and_keeps_its_full_size():
    data = encode(photo(1200, 900), "JPEG", quality=92)
    full = images.load_image(data)
    reduced = images.load_image(data, needed=needed_at(256))
    assert full.scale == 1 and full.size == (900, 1200) and full.full_hash == full.pixel_hash
    assert reduced.scale == 4 and reduced.size == (900, 1200) and reduced.full_hash is None
    assert reduced.image.size == (300, 225)  # its 224x288 bucket needs 225x300
    # never reduced below what the bucket needs: it still covers the bucket without upscaling
    need_h, need_w = needed_size(900, 1200, 256)
    assert reduced.image.height >= need_h and reduced.image.width >= need_w
    # DCT scaling is a fine downscale: close to Lanczos from the full decode
    lanczos = np.asarray(full.image.resize(reduced.image.size, Image.Resampling.LANCZOS), float)
    assert np.abs(np.asarray(reduced.image, float) - lanczos).mean() < 4
    # PNGs and small JPEGs are decoded whole
    assert images.load_image(encode(photo(1200, 900), "PNG"), needed=needed_at(256)).scale == 1
    assert images.load_image(encode(photo(300, 200), "JPEG"), needed=needed_at(256)).scale == 1


def test_reduced_decode_crops_the_same_region_as_a_full_decode():
    """The bucket geometry comes from the full size, so a reduced decode differs only by its filter."""
    from pixart_tune.data.buckets import nearest_bucket, resize_to_bucket

    chelsea = Image.open(REPO / "datasets" / "samples" / "chelsea.jpg").convert("RGB")  # scikit-image's public-domain photo, shipped here
    big = chelsea.resize((1353, 900), Image.Resampling.LANCZOS)  # a real photo, 3x its bucket
    data = encode(big, "JPEG", quality=92)
    full = images.load_image(data)
    reduced = images.load_image(data, needed=needed_at(256))
    assert reduced.scale == 4
    for crop in ("center", "top", "random"):
        bucket = nearest_bucket(*full.size, 256)
        a = np.asarray(resize_to_bucket(full.image, bucket, crop, seed=7), float)
        b = np.asarray(resize_to_bucket(reduced.image, bucket, crop, 7, reduced.size, reduced.scale), float)
        assert a.shape == b.shape == (*bucket, 3)
        assert np.abs(a - b).mean() < 1.5, crop  # a one-pixel misplacement would give about 5


def test_reduced_decode_still_finds_truncation_and_corruption():
    data = encode(photo(1600, 1200), "JPEG", quality=92)
    truncated = images.load_image(data[: len(data) // 2], needed=needed_at(256))
    assert isinstance(truncated, images.ImageSkip) and "truncated" in truncated.reason
    corrupt = images.load_image(data[:2000] + bytes(len(data) - 2000), needed=needed_at(256))
    assert isinstance(corrupt, images.ImageSkip)


def test_reduced_decode_applies_exif_orientation():
    data = jpeg_with_orientation(photo(1600, 1200), 6)  # landscape pixels, portrait photo
    loaded = images.load_image(data, needed=needed_at(256))
    assert loaded.scale > 1 and loaded.size == (1600, 1200)
    assert loaded.image.height > loaded.image.width


def test_pixel_hash_is_sha256_of_size_and_rgb_bytes():
    """The definition the cache keys were made with: keys stay valid across versions."""
    image = photo(64, 48)
    loaded = images.load_image(encode(image, "PNG"))
    expected = hashlib.sha256(b"64x48" + image.tobytes()).hexdigest()
    assert loaded.pixel_hash == expected


# duplicates ----------------------------------------------------------------------------
def test_duplicate_finder_confirms_reduced_twins_at_full_size():
    full_hashes = {"a": "full-a", "b": "full-b", "c": "full-a"}
    decoded = []

    def full_hash(ref):
        decoded.append(ref)
        return full_hashes[ref]

    finder = DuplicateFinder(full_hash)
    assert finder.first_copy("a.jpg", (900, 1200), "reduced-1", scale=2, ref="a") is None
    assert decoded == []  # nothing to compare with yet: no full decode
    # same reduced pixels, other full pixels (two JPEGs sharing their low frequencies): not copies
    assert finder.first_copy("b.jpg", (900, 1200), "reduced-1", scale=2, ref="b") is None
    assert decoded == ["b", "a"]
    # same reduced and full pixels: a copy of the first
    assert finder.first_copy("c.jpg", (900, 1200), "reduced-1", scale=2, ref="c") == "a.jpg"
    # a full-size image with a's pixels (a PNG saved from it) is its copy too
    assert finder.first_copy("a.png", (900, 1200), "full-a") == "a.jpg"
    # another size is never compared
    assert finder.first_copy("d.jpg", (901, 1200), "reduced-1", scale=2, ref="d") is None
    assert "d" not in decoded


def test_duplicate_finder_full_size_first_then_reduced():
    finder = DuplicateFinder(lambda ref: {"j": "full-p", "k": "other"}[ref])
    assert finder.first_copy("p.png", (900, 1200), "full-p") is None
    assert finder.first_copy("k.jpg", (900, 1200), "reduced-k", scale=2, ref="k") is None
    assert finder.first_copy("j.jpg", (900, 1200), "reduced-j", scale=2, ref="j") == "p.png"


def test_jpeg_and_its_lossless_copy_are_duplicates_in_either_order(tmp_path, tiny_model):
    """A big JPEG is decoded reduced; a PNG of its pixels is decoded whole: still one picture, whichever comes first."""
    src = tmp_path / "src"
    jpeg = encode(photo(1200, 900, seed=5), "JPEG", quality=90)
    pixels = Image.open(write(src / "a_photo.jpg", jpeg)).convert("RGB")  # the JPEG first
    write(src / "b_copy.png", encode(pixels, "PNG"))
    write(src / "c_copy.bmp", encode(pixels, "BMP"))
    write(src / "d_same.jpg", jpeg[:2] + b"\xff\xfe\x00\x07hello" + jpeg[2:])  # other metadata: other bytes, same pixels
    write(src / "e_other.jpg", encode(photo(1200, 900, seed=6), "JPEG", quality=90))
    other = encode(photo(1200, 900, seed=7), "JPEG", quality=90)
    write(src / "g_photo.jpg", other)
    write(src / "f_first.png", encode(Image.open(src / "g_photo.jpg").convert("RGB"), "PNG"))  # the PNG first
    config = PrepareConfig(source=str(src), out=str(tmp_path / "out"), model=tiny_model, resolution=256, progress=False)
    report = prepare_dataset(config)
    assert report["duplicates"] == [["a_photo.jpg", "b_copy.png"], ["a_photo.jpg", "c_copy.bmp"], ["a_photo.jpg", "d_same.jpg"], ["f_first.png", "g_photo.jpg"]]
    assert [a["source"] for a in report["accepted"]] == ["a_photo.jpg", "e_other.jpg", "f_first.png"]
    # a re-run finds the same from the scan index (full-size hashes included), decoding nothing
    again = prepare_dataset(config)
    assert again["duplicates"] == report["duplicates"] and again["counts"]["images_decoded"] == 0


# threads -------------------------------------------------------------------------------
def test_ordered_map_keeps_order_and_bounds_work_in_flight():
    pulled = []
    lock = threading.Lock()

    def items():
        for i in range(40):
            with lock:
                pulled.append(i)
            yield i

    results = ordered_map(lambda i: i * i, items(), workers=3, in_flight=4)
    first = next(results)
    assert first == (0, 0) and len(pulled) <= 4
    assert [r for _, r in results] == [i * i for i in range(1, 40)]
    assert list(ordered_map(str, range(5), workers=1)) == [(i, str(i)) for i in range(5)]
    assert resolve_workers(0) >= 1 and resolve_workers(3) == 3
    with pytest.raises(ValueError, match="workers"):
        PrepareConfig(source="s", out="o", workers=-1)


def test_bucketed_images_same_crops_on_any_number_of_threads(tmp_path):
    src = tmp_path / "src"
    for i, (w, h) in enumerate([(1200, 900), (700, 1000), (300, 300), (900, 400), (640, 480), (1000, 1000)]):
        write(src / f"{i}.jpg", encode(photo(w, h, seed=i), "JPEG", quality=90))
    write(src / "broken.jpg", b"not an image")

    def crops(workers):
        config = PrepareConfig(source=str(src), out=str(tmp_path / "unused"), resolution=256, workers=workers)
        return [(e.source, o.bucket, o.pixel_hash, np.asarray(o.pixels).tobytes()) if isinstance(o, Bucketed) else (e.source, o.reason) for e, o in bucketed_images(config)]

    serial, threaded = crops(1), crops(3)
    assert serial == threaded
    assert [c[0] for c in serial] == ["0.jpg", "1.jpg", "2.jpg", "3.jpg", "4.jpg", "5.jpg", "broken.jpg"]
    assert "not an image" in serial[-1][1]
    for source, bucket, _, pixels in serial[:-1]:
        assert len(pixels) == bucket[0] * bucket[1] * 3
    assert not (tmp_path / "unused").exists()  # the stage alone writes nothing


# scan index ----------------------------------------------------------------------------
def test_rerun_decodes_nothing_and_an_edit_is_seen_even_with_the_same_size_and_time(tmp_path, tiny_model):
    src, out = tmp_path / "src", tmp_path / "out"
    for i in range(3):
        write(src / f"{i}.bmp", encode(photo(300, 256, seed=i), "BMP"))
    write(src / "big.jpg", encode(photo(1200, 900, seed=9), "JPEG"))
    write(src / "bad.jpg", b"GIF89a broken")
    config = PrepareConfig(source=str(src), out=str(out), model=tiny_model, resolution=256, progress=False)
    first = prepare_dataset(config)
    assert first["counts"]["images_decoded"] == 5 and first["models_loaded"] == ["vae", "text_encoder"]
    assert (out / INDEX).is_file()

    again = prepare_dataset(config)
    assert again["counts"]["images_decoded"] == 0 and again["models_loaded"] == []
    assert again["accepted"] == first["accepted"] and again["skipped"] == first["skipped"]

    # new pixels, same byte count and modification time: still decoded and encoded again
    target = src / "1.bmp"
    info = target.stat()
    edited = encode(photo(300, 256, seed=77), "BMP")
    assert len(edited) == info.st_size
    target.write_bytes(edited)
    os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns))
    changed = prepare_dataset(config)
    assert changed["counts"]["images_decoded"] == 1 and changed["counts"]["latents_encoded"] == 1
    assert changed["models_loaded"] == ["vae"]

    # a deleted latent is made again from a file the index knows
    latent = next((out / "latents").glob("*.safetensors"))
    latent.unlink()
    resumed = prepare_dataset(config)
    assert resumed["counts"]["latents_encoded"] == 1 and resumed["counts"]["images_decoded"] == 1

    # a damaged index costs decoding, never a wrong result
    (out / INDEX).write_text("{not json", encoding="utf-8")
    damaged = prepare_dataset(config)
    assert damaged["counts"]["images_decoded"] == 5 and damaged["counts"]["latents_encoded"] == 0
    assert damaged["accepted"] == changed["accepted"]
    assert json.loads((out / INDEX).read_text(encoding="utf-8"))["format"] == 1


def test_rerun_over_the_messy_folder_reports_the_same_without_decoding(messy_copy, tiny_model):
    src, out = messy_copy
    config = PrepareConfig(source=str(src), out=str(out), model=tiny_model, resolution=256, progress=False)
    first = prepare_dataset(config)
    again = prepare_dataset(config)
    assert again["counts"]["images_decoded"] == 0 and again["models_loaded"] == []
    for key in ("accepted", "skipped", "duplicates", "buckets", "caption_sources", "overlong_captions"):
        assert again[key] == first[key], key


@pytest.fixture
def messy_copy(tmp_path):
    from tests.test_prepare import make_messy_folder

    return make_messy_folder(tmp_path / "src", tmp_path / "outside"), tmp_path / "out"
