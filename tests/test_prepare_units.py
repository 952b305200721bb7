"""Pure parts of prepare: buckets, decoding and colour modes, captions, the folder scan."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from pixart_tune.data import buckets, captions, images
from pixart_tune.data.scan import scan_folder
from tests.prepare_fixtures import encode, jpeg_with_orientation, photo, png_claiming_size, write


# buckets ------------------------------------------------------------------------------
@pytest.mark.parametrize("resolution", [256, 512, 1024, 2048])
def test_buckets_are_diffusers_tables_and_nearest(resolution):
    from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha, pipeline_pixart_sigma

    table = {256: pipeline_pixart_alpha.ASPECT_RATIO_256_BIN, 512: pipeline_pixart_alpha.ASPECT_RATIO_512_BIN,
             1024: pipeline_pixart_alpha.ASPECT_RATIO_1024_BIN, 2048: pipeline_pixart_sigma.ASPECT_RATIO_2048_BIN}[resolution]
    assert buckets.bucket_table(resolution) is table  # imported, not copied
    for height, width in [(100, 400), (300, 451), (1000, 1000), (4000, 3000), (1080, 1920), (999, 250)]:
        bucket = buckets.nearest_bucket(height, width, resolution)
        assert bucket in buckets.bucket_sizes(resolution)
        distances = {key: abs(float(key) - height / width) for key in table}
        best = min(distances.values())
        assert any(distances[k] == best and tuple(map(int, table[k])) == bucket for k in table)


def test_resize_to_bucket_covers_and_crops_exactly():
    image = photo(451, 300)
    for bucket in [(208, 304), (256, 256), (512, 128), (128, 512)]:
        out = buckets.resize_to_bucket(image, bucket)
        assert (out.height, out.width) == bucket
    # already the bucket's size: untouched pixels
    same = photo(304, 208)
    assert np.array_equal(np.asarray(buckets.resize_to_bucket(same, (208, 304))), np.asarray(same))


def test_crop_positions():
    assert buckets.crop_box((300, 200), (200, 200), "center") == (0, 50, 200, 250)
    assert buckets.crop_box((300, 200), (200, 200), "top") == (0, 0, 200, 200)
    box = buckets.crop_box((300, 200), (200, 200), "random", seed=3)
    assert box == buckets.crop_box((300, 200), (200, 200), "random", seed=3)
    assert 0 <= box[1] <= 100


# images -------------------------------------------------------------------------------
def test_bad_files_give_plain_reasons():
    jpeg, png = encode(photo(300, 200), "JPEG"), encode(photo(300, 200), "PNG")
    cases = {
        b"": "empty",
        jpeg[: len(jpeg) // 2]: "truncated",
        png[: len(png) // 2]: "truncated",
        png[:60] + bytes(len(png) - 60): "corrupt",
        b"just some text, not a picture": "not an image",
        png_claiming_size(100_000, 100_000): "decompression bomb",
    }
    for data, word in cases.items():
        result = images.load_image(data)
        assert isinstance(result, images.ImageSkip) and word in result.reason, (word, result)
    limited = images.load_image(png, max_pixels=10_000)
    assert isinstance(limited, images.ImageSkip) and "decompression bomb" in limited.reason


def test_exif_orientation_makes_portrait():
    landscape = photo(320, 240)
    loaded = images.load_image(jpeg_with_orientation(landscape, 6))  # 6 = rotate 90 CW to display
    assert (loaded.image.width, loaded.image.height) == (240, 320)
    assert buckets.nearest_bucket(loaded.image.height, loaded.image.width, 256)[0] > 256 - 1


def test_colour_modes_convert_to_rgb():
    gradient = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (16, 1))
    gray16 = images.load_image(encode(Image.fromarray(gradient), "PNG"))
    assert gray16.original_mode.startswith("I")
    row = np.asarray(gray16.image)[0, :, 0]
    assert row[0] == 0 and row[-1] == 255 and row[32] in range(125, 135)  # scaled, not clipped to white

    rgb = photo(64, 48)
    cmyk = images.load_image(encode(rgb.convert("CMYK"), "JPEG", quality=98))
    assert cmyk.original_mode == "CMYK" and cmyk.image.mode == "RGB"
    assert np.abs(np.asarray(cmyk.image, float) - np.asarray(rgb, float)).mean() < 12

    gray = images.load_image(encode(rgb.convert("L"), "PNG"))
    assert gray.image.mode == "RGB" and np.array_equal(np.asarray(gray.image)[..., 0], np.asarray(rgb.convert("L")))

    palette = images.load_image(encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"))
    assert palette.original_mode == "P" and palette.image.mode == "RGB"

    # transparent pixels hide black: they must come out as the background, not black
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[:, 16:] = (200, 10, 10, 255)
    transparent = images.load_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    pixels = np.asarray(transparent.image)
    assert pixels[0, 0].tolist() == [255, 255, 255] and pixels[0, 20].tolist() == [200, 10, 10]
    on_grey = images.load_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), background=(128, 128, 128))
    assert np.asarray(on_grey.image)[0, 0].tolist() == [128, 128, 128]

    # palette with a transparent index
    p = Image.new("P", (8, 8), 0)
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    p.paste(1, (4, 0, 8, 8))
    p_loaded = images.load_image(encode(p, "PNG", transparency=0))
    assert np.asarray(p_loaded.image)[0, 0].tolist() == [255, 255, 255] and np.asarray(p_loaded.image)[0, 6].tolist() == [0, 255, 0]


def test_same_pixels_same_hash_whatever_the_file():
    image = photo(64, 48)
    as_png = images.load_image(encode(image, "PNG"))
    as_bmp = images.load_image(encode(image, "BMP"))
    as_tiff = images.load_image(encode(image, "TIFF"))
    assert as_png.pixel_hash == as_bmp.pixel_hash == as_tiff.pixel_hash
    assert as_png.pixel_hash != images.load_image(encode(photo(64, 48, seed=1), "PNG")).pixel_hash


# captions -----------------------------------------------------------------------------
def test_caption_encodings_and_whitespace():
    text = "a café at night"
    for data in [text.encode("utf-8"), b"\xef\xbb\xbf" + text.encode("utf-8"), text.encode("utf-16"), text.encode("cp1252")]:
        assert captions.clean(captions.decode_text(data)) == text
    assert captions.clean("  a red\n\tfox \r\n") == "a red fox"


def test_sidecar_order(tmp_path):
    image = write(tmp_path / "a.png", encode(photo(8, 8), "PNG"))
    assert captions.sidecar_text(image) is None
    (tmp_path / "a.caption").write_text("from caption file")
    assert captions.clean(captions.sidecar_text(image)) == "from caption file"
    (tmp_path / "a.txt").write_text("  from txt file \n")
    assert captions.clean(captions.sidecar_text(image)) == "from txt file"
    (tmp_path / "a.txt").write_text("   ")  # blank sidecar: the next one counts
    assert captions.clean(captions.sidecar_text(image)) == "from caption file"
    # a sidecar linking outside the source folder is not read
    src = tmp_path / "src"
    inside = write(src / "b.png", encode(photo(8, 8), "PNG"))
    write(tmp_path / "secret.txt", b"private text")
    os.symlink(tmp_path / "secret.txt", src / "b.txt")
    assert captions.sidecar_text(inside, root=src) is None
    assert captions.clean(captions.sidecar_text(inside)) == "private text"  # without a root there is nothing to guard


def test_filename_captions():
    assert captions.filename_caption("red_fox-in snow.jpg") == "red fox in snow"
    assert captions.filename_caption("portrait_of_Anna_2.png") == "portrait of Anna"
    for name in ["IMG_0042.JPG", "DSC01234.jpg", "PXL_20230101_123456.jpg", "3f2a9c1e7b6d4e0f.png", "0001.png"]:
        assert captions.filename_caption(name) is None, name


def test_compose_trigger_prefix_suffix():
    assert captions.compose("a dog", trigger="sks") == "sks, a dog"
    assert captions.compose("a sks dog", trigger="sks") == "a sks dog"
    assert captions.compose("a dog", prefix="photo of ", suffix=", 35mm") == "photo of a dog, 35mm"
    assert captions.compose("", trigger="sks") == "sks"
    assert captions.compose("", trigger="") == ""


# scan ---------------------------------------------------------------------------------
def test_scan_extensions_and_symlinks(tmp_path):
    src, outside = tmp_path / "src", tmp_path / "outside"
    for name in ["a.jpg", "b.JPEG", "c.Png", "d.webp", "e.BMP", "f.tif", "g.TIFF", "deep/er/h.jpg", "notes.txt", "raw.cr2"]:
        write(src / name, b"x")
    write(outside / "secret.jpg", b"x")
    os.symlink(outside / "secret.jpg", src / "leak.jpg")
    os.symlink(src / "a.jpg", src / "alias.jpg")
    os.symlink(outside, src / "linked_dir")
    os.symlink(src / "missing.jpg", src / "dangling.jpg")
    found = {f.source: f.skip for f in scan_folder(src)}
    assert set(found) == {"a.jpg", "b.JPEG", "c.Png", "d.webp", "e.BMP", "f.tif", "g.TIFF", "deep/er/h.jpg", "leak.jpg", "alias.jpg", "linked_dir", "dangling.jpg"}
    assert "outside the source" in found["leak.jpg"] and "outside the source" in found["linked_dir"]
    assert "broken symlink" in found["dangling.jpg"]
    assert found["alias.jpg"] is None and found["a.jpg"] is None
