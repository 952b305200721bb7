"""``prepare`` end to end on the tiny model: a messy folder in, a cache equal to the model's own encoders out."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixart_tune.commands.prepare import main as cli
from pixart_tune.data.buckets import bucket_sizes, nearest_bucket
from pixart_tune.data.cache import FeatureCache
from pixart_tune.data.prepare import PrepareConfig, prepare_dataset
from pixart_tune.errors import UserError
from tests.prepare_fixtures import encode, jpeg_with_orientation, photo, png_claiming_size, write

GOOD = {  # source -> caption expected from its sidecar (None: from the file name or none)
    "square.png": "a photo of a red house",
    "wide.JPG": "a wide photo of the sky",
    "tall.jpeg": "a tall tree",
    "shot.webp": "a photo of a dog",
    "old.BMP": "a small cat",
    "scan.tiff": "a blue house",
    "nested/deeper/cat_on_a_wall.png": None,
    "cmyk.jpg": "a cmyk photo",
    "gray16.png": "a grey photo",
    "palette.png": "a palette photo",
    "transparent.png": "a cut out cat",
    "rotated.jpg": "a portrait photo",
    "cp1252.png": "a café at night",
}
BAD = {  # source -> word the reason must contain
    "empty.jpg": "empty",
    "truncated.jpg": "truncated",
    "truncated.png": "truncated",
    "corrupt.png": "corrupt",
    "notes.jpg": "not an image",
    "bomb.png": "decompression bomb",
    "tiny.png": "too small",
    "leak.jpg": "outside the source",
}


def make_messy_folder(root: Path, outside: Path) -> Path:
    src = root
    sizes = {"square.png": (256, 256), "wide.JPG": (420, 180), "tall.jpeg": (160, 330), "shot.webp": (300, 220),
             "old.BMP": (280, 210), "scan.tiff": (230, 300), "nested/deeper/cat_on_a_wall.png": (260, 260)}
    for i, (name, (w, h)) in enumerate(sizes.items()):
        fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tiff": "TIFF"}[Path(name).suffix.lower()]
        write(src / name, encode(photo(w, h, seed=i), fmt))
    write(src / "cmyk.jpg", encode(photo(300, 200, seed=20).convert("CMYK"), "JPEG"))
    write(src / "gray16.png", encode(Image.fromarray((np.asarray(photo(260, 200, seed=21).convert("L"), np.uint16) * 257)), "PNG"))
    write(src / "palette.png", encode(photo(240, 240, seed=22).convert("P", palette=Image.Palette.ADAPTIVE), "PNG"))
    rgba = np.zeros((256, 256, 4), np.uint8)
    rgba[64:192, 64:192] = (30, 160, 40, 255)
    write(src / "transparent.png", encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    write(src / "rotated.jpg", jpeg_with_orientation(photo(320, 240, seed=23), 6))  # landscape pixels, portrait photo
    write(src / "cp1252.png", encode(photo(256, 256, seed=24), "PNG"))
    for name, caption in GOOD.items():
        if caption and name != "cp1252.png":
            write((src / name).with_suffix(".txt"), caption.encode("utf-8"))
    write(src / "cp1252.caption", GOOD["cp1252.png"].encode("cp1252"))
    # exact duplicate of square.png, in another format
    write(src / "square_copy.bmp", encode(Image.open(src / "square.png").convert("RGB"), "BMP"))
    # bad files
    jpeg, png = encode(photo(300, 200, seed=30), "JPEG"), encode(photo(300, 200, seed=31), "PNG")
    write(src / "empty.jpg", b"")
    write(src / "truncated.jpg", jpeg[: len(jpeg) // 2])
    write(src / "truncated.png", png[: len(png) // 2])
    write(src / "corrupt.png", png[:60] + bytes(len(png) - 60))
    write(src / "notes.jpg", b"this is a text file with an image extension\n")
    write(src / "bomb.png", png_claiming_size(120_000, 120_000))
    write(src / "tiny.png", encode(photo(40, 40), "PNG"))
    write(outside / "private.jpg", encode(photo(300, 300, seed=40), "JPEG"))
    os.symlink(outside / "private.jpg", src / "leak.jpg")
    write(src / "readme.md", b"not an image extension: ignored")
    return src


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            info = path.lstat()
            digest.update(f"{path.relative_to(root)}|{info.st_mode}|{info.st_mtime_ns}".encode())
            if path.is_symlink():
                digest.update(os.readlink(path).encode())
            elif path.is_file():
                digest.update(path.read_bytes())
    return digest.hexdigest()


def set_read_only(root: Path, read_only: bool) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():
                path.chmod(0o444 if read_only else 0o644)
        Path(dirpath).chmod(0o555 if read_only else 0o755)


@pytest.fixture(scope="module")
def messy(tmp_path_factory, tiny_model):
    """The messy folder prepared once; later tests read the result."""
    base = tmp_path_factory.mktemp("messy")
    src = make_messy_folder(base / "src", base / "outside")
    before = tree_digest(src)
    set_read_only(src, True)
    try:
        report = prepare_dataset(PrepareConfig(source=str(src), out=str(base / "out"), model=tiny_model, resolution=256, batch_size=4, progress=False))
    finally:
        set_read_only(src, False)
    return {"src": src, "out": base / "out", "report": report, "before": before, "base": base}


def test_every_good_image_accepted_every_bad_one_skipped_with_reason(messy):
    report = messy["report"]
    accepted = {a["source"]: a for a in report["accepted"]}
    assert set(accepted) == set(GOOD)
    skipped = {s["source"]: s["reason"] for s in report["skipped"]}
    assert set(skipped) == set(BAD)
    for source, word in BAD.items():
        assert word in skipped[source], (source, skipped[source])
    assert report["duplicates"] == [["square.png", "square_copy.bmp"]]
    for source, caption in GOOD.items():
        if caption:
            assert accepted[source]["caption"] == caption
    assert accepted["nested/deeper/cat_on_a_wall.png"]["caption"] == "cat on wall"
    assert accepted["nested/deeper/cat_on_a_wall.png"]["caption_from"] == "filename"
    saved = json.loads((messy["out"] / "report.json").read_text(encoding="utf-8"))
    assert saved["accepted"] == report["accepted"] and saved["skipped"] == report["skipped"]


def test_source_left_byte_for_byte_unchanged(messy):
    assert tree_digest(messy["src"]) == messy["before"]
    assert not any(p.name.endswith((".safetensors", ".json")) for p in messy["src"].rglob("*"))


def test_buckets_are_table_values_and_nearest(messy):
    for item in messy["report"]["accepted"]:
        bucket = tuple(item["bucket"])
        assert bucket in bucket_sizes(256)
        assert bucket == nearest_bucket(*item["size"], 256)
    accepted = {a["source"]: a for a in messy["report"]["accepted"]}
    assert accepted["rotated.jpg"]["size"] == [320, 240]
    height, width = accepted["rotated.jpg"]["bucket"]
    assert height > width  # a portrait photo stored landscape lands in a portrait bucket
    assert sum(messy["report"]["buckets"].values()) == len(GOOD)


def test_manifest_matches_report_and_latent_shapes(messy):
    cache = FeatureCache(messy["out"])
    manifest = cache.read_manifest()
    assert [i.source for i in manifest.items] == [a["source"] for a in messy["report"]["accepted"]]
    assert manifest.resolution == 256 and manifest.max_tokens == 300 and manifest.caption_channels == 32
    for item in manifest.items:
        latent = cache.read_latent(item.latent_key)
        assert latent.shape == (4, item.bucket[0] // 8, item.bucket[1] // 8)
        embeds, mask = cache.read_text(item.text_key, manifest.max_tokens)
        assert embeds.shape == (300, 32) and mask.sum() > 0
    empty, mask = cache.read_text(manifest.empty_text_key, 300)
    assert mask.sum() == 1  # the end-of-sequence token alone


def test_cached_features_equal_the_model_folders_vae_and_t5(messy, tiny_model):
    from diffusers import PixArtSigmaPipeline
    from diffusers.image_processor import VaeImageProcessor

    cache = FeatureCache(messy["out"])
    manifest = cache.read_manifest()
    item = next(i for i in manifest.items if i.source == "square.png")  # 256x256: its bucket, no resize
    pipe = PixArtSigmaPipeline.from_pretrained(tiny_model)
    pixels = VaeImageProcessor().preprocess(Image.open(messy["src"] / "square.png").convert("RGB"))
    with torch.no_grad():
        expected = pipe.vae.encode(pixels).latent_dist.mode()[0] * pipe.vae.config.scaling_factor
    torch.testing.assert_close(cache.read_latent(item.latent_key), expected, atol=1e-5, rtol=1e-4)

    for caption, key in [(item.caption, item.text_key), ("", manifest.empty_text_key)]:
        with torch.no_grad():
            embeds, mask, _, _ = pipe.encode_prompt(caption, do_classifier_free_guidance=False, device="cpu")
        cached, cached_mask = cache.read_text(key, 300)
        assert torch.equal(cached_mask, mask[0].long())
        valid = mask[0].bool()
        torch.testing.assert_close(cached[valid], embeds[0][valid], atol=1e-5, rtol=1e-4)


def test_rerun_reencodes_nothing_and_one_change_reencodes_one(messy, tiny_model, tmp_path):
    config = PrepareConfig(source=str(messy["src"]), out=str(messy["out"]), model=tiny_model, resolution=256, progress=False)
    again = prepare_dataset(config)
    assert again["counts"]["latents_encoded"] == 0 and again["counts"]["texts_encoded"] == 0
    assert again["counts"]["latents_reused"] == len(GOOD)
    assert [a["source"] for a in again["accepted"]] == [a["source"] for a in messy["report"]["accepted"]]

    # change one image (same size, new pixels): only it is encoded again
    target = messy["src"] / "shot.webp"
    original = target.read_bytes()
    try:
        target.write_bytes(encode(photo(300, 220, seed=99), "WEBP"))
        changed = prepare_dataset(config)
    finally:
        target.write_bytes(original)
    assert changed["counts"]["latents_encoded"] == 1 and changed["counts"]["texts_encoded"] == 0

    # a new caption for one image: one text encoded, no latent
    sidecar = messy["src"] / "tall.txt"
    caption = sidecar.read_bytes()
    try:
        sidecar.write_text("a very tall tree", encoding="utf-8")
        recaptioned = prepare_dataset(config)
    finally:
        sidecar.write_bytes(caption)
    assert recaptioned["counts"]["latents_encoded"] == 0 and recaptioned["counts"]["texts_encoded"] == 1


def test_interrupted_run_resumes(tiny_model, tmp_path):
    """A run killed part-way leaves complete entries and no manifest; the next run encodes only the rest."""
    src, out = tmp_path / "src", tmp_path / "out"
    for i in range(4):
        write(src / f"{i}.png", encode(photo(256, 256, seed=i), "PNG"))
    config = PrepareConfig(source=str(src), out=str(out), model=tiny_model, resolution=256, progress=False)
    prepare_dataset(config)
    latents = sorted((out / "latents").glob("*.safetensors"))
    for path in latents[:2]:
        path.unlink()
    (out / "dataset.json").unlink()
    (out / "report.json").unlink()
    resumed = prepare_dataset(config)
    assert resumed["counts"]["latents_encoded"] == 2 and resumed["counts"]["latents_reused"] == 2
    assert resumed["counts"]["texts_encoded"] == 0
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temporary files left
    assert len(FeatureCache(out).read_manifest().items) == 4


def test_trigger_prefix_suffix_and_overlong_captions(tmp_path, tiny_model):
    src = tmp_path / "src"
    write(src / "one.png", encode(photo(256, 256, 1), "PNG"))
    write(src / "one.txt", b"a photo of a dog")
    write(src / "long.png", encode(photo(256, 256, 2), "PNG"))
    write(src / "long.txt", (" ".join(["a red house with a blue door"] * 60)).encode())
    write(src / "IMG_0001.png", encode(photo(256, 256, 3), "PNG"))
    report = prepare_dataset(PrepareConfig(source=str(src), out=str(tmp_path / "out"), model=tiny_model, resolution=256,
                                           trigger="sks", prefix="photo: ", suffix=", sharp", progress=False))
    captions = {a["source"]: a["caption"] for a in report["accepted"]}
    assert captions["one.png"] == "sks, photo: a photo of a dog, sharp"
    assert captions["IMG_0001.png"] == "sks, photo: , sharp"
    assert report["caption_sources"] == {"sidecar": 2, "none": 1}
    assert [o["source"] for o in report["overlong_captions"]] == ["long.png"]
    assert report["overlong_captions"][0]["tokens"] > 300


def test_too_small_rule_follows_max_upscale(tmp_path, tiny_model):
    src = tmp_path / "src"
    write(src / "half.png", encode(photo(128, 128), "PNG"))  # needs exactly 2x for 256x256
    write(src / "smaller.png", encode(photo(100, 100, 1), "PNG"))
    report = prepare_dataset(PrepareConfig(source=str(src), out=str(tmp_path / "a"), model=tiny_model, resolution=256, progress=False))
    assert [a["source"] for a in report["accepted"]] == ["half.png"]
    assert "2.6x upscaling" in report["skipped"][0]["reason"]
    strict = prepare_dataset(PrepareConfig(source=str(src), out=str(tmp_path / "b"), model=tiny_model, resolution=256, max_upscale=1.0, progress=False))
    assert strict["accepted"] == [] and len(strict["skipped"]) == 2
    # Nothing to train on: no T5 loaded for the empty prompt alone, no manifest to train from.
    assert "text_encoder" not in strict["models_loaded"]
    assert not (tmp_path / "b" / "dataset.json").exists() and (tmp_path / "b" / "report.json").is_file()


def test_out_inside_source_is_refused(tmp_path, tiny_model):
    src = tmp_path / "src"
    write(src / "a.png", encode(photo(256, 256), "PNG"))
    with pytest.raises(UserError, match="inside the source"):
        prepare_dataset(PrepareConfig(source=str(src), out=str(src / "prepared"), model=tiny_model, resolution=256))
    assert sorted(p.name for p in src.iterdir()) == ["a.png"]
    # A source named like prepare's own text/ folder, with --out around it.
    text = tmp_path / "data" / "text"
    write(text / "a.png", encode(photo(256, 256), "PNG"))
    with pytest.raises(UserError, match="is inside --out"):
        prepare_dataset(PrepareConfig(source=str(text), out=str(tmp_path / "data"), model=tiny_model, resolution=256))
    assert sorted(p.name for p in text.iterdir()) == ["a.png"]


def test_out_holding_the_users_files_is_refused(tmp_path, tiny_model):
    src, out = tmp_path / "src", tmp_path / "mine"
    write(src / "a.png", encode(photo(256, 256), "PNG"))
    write(out / "report.json", b"my own report")
    (out / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match=r"holds files prepare did not write \(notes.txt\)"):
        prepare_dataset(PrepareConfig(source=str(src), out=str(out), model=tiny_model, resolution=256, progress=False))
    assert (out / "report.json").read_bytes() == b"my own report"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "report.json"]


def test_config_checks_values():
    with pytest.raises(ValueError, match="resolution"):
        PrepareConfig(source="s", out="o", resolution=300)
    with pytest.raises(ValueError, match="caption_order"):
        PrepareConfig(source="s", out="o", caption_order=("sidecar", "exif"))
    with pytest.raises(ValueError, match="max_upscale"):
        PrepareConfig(source="s", out="o", max_upscale=0.5)


def test_cli_prints_summary(tmp_path, tiny_model, capsys):
    from pixart_tune.config import ConfigError

    src = tmp_path / "src"
    write(src / "a.png", encode(photo(256, 256), "PNG"))
    write(src / "b.jpg", b"")
    assert cli([str(src), "--out", str(tmp_path / "out"), "--model", tiny_model, "--resolution", "256", "--trigger", "sks", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "prepared 1 of 2 images" in text and "b.jpg: empty file" in text and "256x256: 1" in text
    write(tmp_path / "bad" / "b.jpg", b"")
    with pytest.raises(UserError, match="no usable image"):
        cli([str(tmp_path / "bad"), "--out", str(tmp_path / "none"), "--model", tiny_model, "--no-progress"])
    assert "b.jpg: empty file" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="crop"):
        cli([str(src), "--out", str(tmp_path / "o2"), "--model", tiny_model, "--set", "crop=sideways"])
    with pytest.raises(ConfigError, match="unknown key"):
        cli([str(src), "--out", str(tmp_path / "o2"), "--model", tiny_model, "--set", "resolutoin=256"])
