"""The ``class-images`` verb on the tiny pipeline: class images, their captions, resuming, conflicts, prepare."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from pixart_tune.class_images import ClassImagesConfig, recorded_prompt, survey
from pixart_tune.commands.class_images import main as cli
from pixart_tune.errors import UserError
from pixart_tune.generation import save_png
from pixart_tune.sampling import Sampler

PROMPT = "a photo of a dog"
SEED = 5
SIZE = (64, 64)
FAST = ["--steps", "2", "--size", f"{SIZE[0]}x{SIZE[1]}", "--device", "cpu"]


def run(model: str, out, *extra: str) -> int:
    return cli([PROMPT, "--model", model, "--out", str(out), "--seed", str(SEED), *FAST, *extra])


@pytest.fixture(scope="module")
def drawn(tiny_model, tmp_path_factory):
    """Three class images drawn once by the verb: copy the folder before changing it."""
    out = tmp_path_factory.mktemp("class") / "dog"
    assert run(tiny_model, out, "--count", "3") == 0
    return out


def _copy(drawn, tmp_path):
    out = tmp_path / "dog"
    shutil.copytree(drawn, out)
    return out


def test_images_and_captions_are_what_the_sampler_draws(drawn, tiny_model):
    assert sorted(p.name for p in drawn.iterdir()) == [f"class_0000{i}.{ext}" for i in range(3) for ext in ("png", "txt")]
    sampler = Sampler(tiny_model, device="cpu")
    expected = sampler.generate([PROMPT] * 3, [SEED, SEED + 1, SEED + 2], steps=2, height=SIZE[0], width=SIZE[1])
    for index in range(3):
        assert (drawn / f"class_0000{index}.txt").read_text(encoding="utf-8") == PROMPT + "\n"
        with Image.open(drawn / f"class_0000{index}.png") as image:
            parameters = json.loads(image.text["pixart-tune"])
            assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected[index]))
        assert parameters["prompt"] == PROMPT and parameters["seed"] == SEED + index
        assert (parameters["steps"], parameters["height"], parameters["width"], parameters["adapters"]) == (2, *SIZE, [])


def test_a_larger_count_draws_only_the_missing_images(drawn, tiny_model, tmp_path, capsys):
    out = _copy(drawn, tmp_path)
    (out / "class_00001.txt").unlink()  # killed between an image and its caption
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("*.png")}
    assert run(tiny_model, out, "--count", "4") == 0
    for name, (data, mtime) in before.items():
        assert (out / name).read_bytes() == data and (out / name).stat().st_mtime_ns == mtime, name
    assert (out / "class_00001.txt").read_text(encoding="utf-8") == PROMPT + "\n"
    assert recorded_prompt(out / "class_00003.png") == PROMPT
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"4 class images in {out} (1 drawn now, 3 were there)"
    assert lines[1] == f"next: pixart-tune prepare {out} --out prepared/dog --model {tiny_model} --resolution 256"
    assert lines[2] == "then in the recipe: data.extra: [{path: prepared/dog, kind: class}]"


def test_an_interrupted_run_leaves_whole_files_and_goes_on(tiny_model, tmp_path, monkeypatch, capsys):
    out = tmp_path / "dog"
    original, calls = Sampler.generate, []

    def interrupt(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Sampler, "generate", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_model, out, "--count", "3")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["class_00000.png", "class_00000.txt", "dog"]  # no temporary files
    capsys.readouterr()
    assert run(tiny_model, out, "--count", "3") == 0
    assert capsys.readouterr().out.startswith(f"3 class images in {out} (2 drawn now, 1 were there)")


def test_a_complete_folder_loads_no_model(drawn, tiny_model, tmp_path, monkeypatch, capsys):
    out = _copy(drawn, tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded for a complete folder")

    monkeypatch.setattr("pixart_tune.class_images.Sampler", refuse)
    assert run(tiny_model, out, "--count", "2") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"2 class images in {out} (0 drawn now, 2 were there)"
    assert "holds 1 more class_*.png past --count 2" in lines[1]
    assert "--resolution 256" in lines[2]


def test_files_of_another_prompt_are_refused_then_replaced_with_overwrite(drawn, tiny_model, tmp_path):
    out = _copy(drawn, tmp_path)
    save_png(Image.new("RGB", SIZE, "red"), out / "class_00000.png", {"prompt": "a photo of a cat"})
    (out / "class_00002.txt").write_text("a photo of a cat\n", encoding="utf-8")
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    Image.new("RGB", SIZE, "blue").save(out / "holiday.png")
    kept = (out / "class_00001.png").read_bytes()
    with pytest.raises(UserError) as refused:
        run(tiny_model, out, "--count", "3")
    message = str(refused.value)
    assert "\n" not in message and "class_00000.png was made with another prompt ('a photo of a cat') (and 1 more class_* files)" in message
    assert recorded_prompt(out / "class_00000.png") == "a photo of a cat"  # nothing written
    assert run(tiny_model, out, "--count", "3", "--overwrite") == 0
    assert recorded_prompt(out / "class_00000.png") == PROMPT
    assert (out / "class_00000.png").read_bytes() == (drawn / "class_00000.png").read_bytes()
    assert (out / "class_00002.txt").read_text(encoding="utf-8") == PROMPT + "\n"
    assert (out / "class_00001.png").read_bytes() == kept
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert (out / "holiday.png").is_file() and not list(tmp_path.glob(".*"))  # no temporary files left beside it


def test_the_survey_sorts_unreadable_and_foreign_files(tmp_path):
    (tmp_path / "class_00000.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    Image.new("RGB", SIZE).save(tmp_path / "class_00001.png")  # a PNG without our parameters
    save_png(Image.new("RGB", SIZE), tmp_path / "class_00002.png", {"prompt": PROMPT})
    (tmp_path / "class_00003.txt").write_text(PROMPT)  # a caption of ours without its image
    found = survey(tmp_path, PROMPT, 5)
    assert (found.keep, found.captions, found.draw) == ([2], [2], [0, 1, 3, 4])
    assert [(p.name, why.split(" (")[0]) for p, why in found.conflicts] == [
        ("class_00000.png", "is not a class image of this command"), ("class_00001.png", "is not a class image of this command"),
    ]
    (tmp_path / "class_00004.png").mkdir()
    with pytest.raises(UserError, match="class_00004.png is a folder"):
        survey(tmp_path, PROMPT, 5)


def test_prepare_reads_the_folder_and_its_captions(drawn, tiny_model, tmp_path):
    from pixart_tune.data.prepare import PrepareConfig, prepare_dataset

    config = PrepareConfig(source=str(drawn), out=str(tmp_path / "prepared"), model=tiny_model, resolution=256, max_upscale=4.0, progress=False)
    report = prepare_dataset(config)
    accepted = {item["source"]: item for item in report["accepted"]}
    assert sorted(accepted) == [f"class_0000{i}.png" for i in range(3)]
    assert all(item["caption"] == PROMPT and item["caption_from"] == "sidecar" for item in accepted.values())


def test_help_and_bad_inputs_are_one_line(tiny_model, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        cli(["--help"])
    assert exited.value.code == 0 and "class_00000.png" in capsys.readouterr().out
    (tmp_path / "file").write_text("")
    cases = [
        (["--count", "0"], "count must be 1 to 100000, got 0"),
        (["--steps", "0"], "steps must be 1 to 1000"),
        (["--out", str(tmp_path / "file")], "is a file, where a folder is written"),
    ]
    for extra, expected in cases:
        with pytest.raises(UserError) as refused:
            run(tiny_model, tmp_path / "out", *extra)
        assert expected in str(refused.value) and "\n" not in str(refused.value)
    for prompt, expected in [("  ", "the prompt is empty"), ("a\nb", "the prompt must be one line")]:
        with pytest.raises(UserError, match=expected):
            cli([prompt, "--out", str(tmp_path / "out")])
    with pytest.raises(UserError, match=r"PROMPT is required"):
        cli(["--out", str(tmp_path / "out")])
    with pytest.raises(UserError, match=r"--out is required"):
        cli([PROMPT])
    assert not (tmp_path / "out").exists()
    assert ClassImagesConfig(prompt=f"  {PROMPT} ", out="x").prompt == PROMPT
