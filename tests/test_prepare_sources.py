"""Hugging Face dataset sources and the automatic captioner, on tiny real data and a tiny real BLIP and Florence-2."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from pixart_tune.data.prepare import PrepareConfig, prepare_dataset
from pixart_tune.data.sources import detect_kind
from tests.prepare_fixtures import build_tiny_blip, build_tiny_florence2, encode, photo, write


def run(src, out, model, **kwargs):
    return prepare_dataset(PrepareConfig(source=str(src), out=str(out), model=model, resolution=256, progress=False, **kwargs))


def test_imagefolder_metadata_jsonl_and_csv(tmp_path, tiny_model):
    src = tmp_path / "src"
    write(src / "a.png", encode(photo(256, 256, 1), "PNG"))
    write(src / "b.png", encode(photo(256, 256, 2), "PNG"))
    write(src / "b.txt", b"the sidecar wins")
    write(src / "metadata.jsonl", b'{"file_name": "a.png", "text": "a from jsonl"}\n{"file_name": "b.png", "text": "b from jsonl"}\n')
    write(src / "more/c.png", encode(photo(256, 256, 3), "PNG"))
    write(src / "more/metadata.csv", b"file_name,prompt\nc.png,c from csv\n")
    report = run(src, tmp_path / "out", tiny_model)
    captions = {a["source"]: (a["caption"], a["caption_from"]) for a in report["accepted"]}
    assert captions == {"a.png": ("a from jsonl", "metadata"), "b.png": ("the sidecar wins", "sidecar"), "more/c.png": ("c from csv", "metadata")}
    # the order is the user's to change
    report = run(src, tmp_path / "out2", tiny_model, caption_order=("metadata", "sidecar"))
    assert {a["source"]: a["caption"] for a in report["accepted"]}["b.png"] == "b from jsonl"


def test_save_to_disk_dataset_with_a_corrupt_row(tmp_path, tiny_model):
    import datasets

    good = [encode(photo(256, 256, i), "PNG") for i in range(2)]
    rows = {"image": [{"bytes": good[0], "path": "first.png"}, {"bytes": b"broken", "path": "broken.png"}, {"bytes": good[1], "path": None}],
            "caption": ["first caption", "broken caption", "third caption"]}
    data = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    data.save_to_disk(str(tmp_path / "saved"))
    assert detect_kind(str(tmp_path / "saved")) == "saved"
    report = run(tmp_path / "saved", tmp_path / "out", tiny_model)
    assert [(a["source"], a["caption"]) for a in report["accepted"]] == [("train/0:first.png", "first caption"), ("train/2", "third caption")]
    assert report["skipped"][0]["source"] == "train/1:broken.png" and "not an image" in report["skipped"][0]["reason"]


def test_dataset_loaded_by_name_streams(tmp_path, tiny_model):
    """The hub path (``datasets.load_dataset(name, streaming=True)``), given a local imagefolder name offline."""
    src = tmp_path / "hubish"
    for i in range(3):
        write(src / "train" / f"{i}.png", encode(photo(256, 256, i), "PNG"))
    write(src / "train" / "metadata.jsonl", "".join(json.dumps({"file_name": f"{i}.png", "text": f"image {i}"}) + "\n" for i in range(3)).encode())
    report = run(src, tmp_path / "out", tiny_model, source_kind="hub")
    assert sorted(a["caption"] for a in report["accepted"]) == ["image 0", "image 1", "image 2"]
    assert all(a["caption_from"] == "metadata" for a in report["accepted"])


def test_captioner_fills_missing_captions(tmp_path, tiny_model):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    blip = build_tiny_blip(tmp_path / "blip")
    src = tmp_path / "src"
    write(src / "captioned.png", encode(photo(256, 256, 1), "PNG"))
    write(src / "captioned.txt", b"a human caption")
    write(src / "IMG_0002.png", encode(photo(256, 256, 2), "PNG"))
    write(src / "IMG_0003.png", encode(photo(256, 256, 5), "PNG"))
    report = run(src, tmp_path / "out", tiny_model, captioner=str(blip), caption_max_new_tokens=6, captioner_batch_size=1)
    captions = {a["source"]: a for a in report["accepted"]}
    assert captions["captioned.png"]["caption"] == "a human caption"
    assert captions["IMG_0002.png"]["caption_from"] == "captioner"

    # what the model itself says for that image (256x256: its bucket, no crop)
    processor = AutoProcessor.from_pretrained(blip)
    model = AutoModelForImageTextToText.from_pretrained(blip).eval()
    with torch.no_grad():
        ids = model.generate(**processor(images=Image.open(src / "IMG_0002.png").convert("RGB"), return_tensors="pt"), max_new_tokens=6, num_beams=3, do_sample=False)
    expected = " ".join(processor.batch_decode(ids, skip_special_tokens=True)[0].split())
    assert expected and captions["IMG_0002.png"]["caption"] == expected

    assert report["counts"]["captions_generated"] == 2
    # a re-run reuses the captions (the captioner is not even loaded) and every feature
    again = run(src, tmp_path / "out", tiny_model, captioner=str(blip), caption_max_new_tokens=6)
    assert again["counts"]["captions_generated"] == 0 and again["counts"]["captions_reused"] == 2
    assert again["counts"]["latents_encoded"] == 0 and again["counts"]["texts_encoded"] == 0
    assert [a["caption"] for a in again["accepted"]] == [a["caption"] for a in report["accepted"]]


def test_florence2_captioner_fills_missing_captions(tmp_path, tiny_model):
    """The default captioner's path: Florence-2 with its task prompt taken from the model type, two images in one batch."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from pixart_tune.data.captioner import Captioner

    florence = build_tiny_florence2(tmp_path / "florence2")
    captioner = Captioner(str(florence), torch.device("cpu"))
    assert captioner.prompt == "<MORE_DETAILED_CAPTION>"
    captioner.close()

    src = tmp_path / "src"
    write(src / "captioned.png", encode(photo(256, 256, 1), "PNG"))
    write(src / "captioned.txt", b"a human caption")
    write(src / "IMG_0002.png", encode(photo(256, 256, 2), "PNG"))
    write(src / "IMG_0003.png", encode(photo(256, 256, 5), "PNG"))
    report = run(src, tmp_path / "out", tiny_model, captioner=str(florence), caption_max_new_tokens=12)
    captions = {a["source"]: a for a in report["accepted"]}
    assert captions["captioned.png"]["caption"] == "a human caption"
    assert captions["IMG_0002.png"]["caption_from"] == captions["IMG_0003.png"]["caption_from"] == "captioner"
    assert report["counts"]["captions_generated"] == 2

    # what the model says for each image when run as its model card runs it (256x256: its bucket, no crop)
    processor = AutoProcessor.from_pretrained(florence)
    model = AutoModelForImageTextToText.from_pretrained(florence).eval()
    task = "<MORE_DETAILED_CAPTION>"
    for name in ("IMG_0002.png", "IMG_0003.png"):
        image = Image.open(src / name).convert("RGB")
        with torch.no_grad():
            ids = model.generate(**processor(text=task, images=image, return_tensors="pt"), max_new_tokens=12, num_beams=3, do_sample=False)
        text = processor.batch_decode(ids, skip_special_tokens=False)[0]
        expected = " ".join(processor.post_process_generation(text, task=task, image_size=image.size)[task].split())
        assert expected and captions[name]["caption"] == expected
    assert captions["IMG_0002.png"]["caption"] != captions["IMG_0003.png"]["caption"]


def test_missing_captioner_is_a_clear_error(tmp_path, tiny_model):
    from pixart_tune.errors import UserError

    src = tmp_path / "src"
    write(src / "IMG_0001.png", encode(photo(256, 256), "PNG"))
    with pytest.raises(UserError, match="cannot load captioner"):
        run(src, tmp_path / "out", tiny_model, captioner=str(tmp_path / "no_such_model"))


def test_shipped_prepare_configs_are_valid():
    from pixart_tune.config import from_dict, load_yaml
    from tests.conftest import REPO

    configs = sorted((REPO / "datasets").rglob("*.yaml"))
    assert configs
    for path in configs:
        data = load_yaml(path)
        config = from_dict(PrepareConfig, dict(data, source="src", out="out"))
        assert config.resolution in (256, 512, 1024, 2048), path


def test_shipped_imagefolder_example(tmp_path, tiny_model):
    from tests.conftest import REPO

    report = run(REPO / "datasets" / "examples" / "imagefolder", tmp_path / "out", tiny_model)
    assert [(a["source"], a["caption_from"]) for a in report["accepted"]] == [("train/astronaut.jpg", "metadata"), ("train/rocket.jpg", "metadata")]
    assert report["skipped"] == [] and report["accepted"][0]["caption"].startswith("a portrait photo of a smiling astronaut")
