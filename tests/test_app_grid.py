"""The app's prompt grid without a browser: the ``sample`` verb's images and grid, its parameters, its limits."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pixart_tune.app import AppSettings, PreviewApp
from pixart_tune.app.grid import MAX_IMAGES, layout, parse_prompts, parse_seeds, prompt_grid
from pixart_tune.errors import UserError
from pixart_tune.sampling import SampleConfig, comparison_grid, sample
from tests.test_app import make_adapter

PROMPTS = ["a red fox in the snow", "a lighthouse on a cliff at dusk, oil painting with heavy brush strokes"]
SEEDS = [3, 5]


def test_prompts_and_seeds_say_what_to_write():
    assert parse_prompts("  a cat \n\n# a comment\na dog\n") == ["a cat", "a dog"]
    with pytest.raises(UserError, match="at least one prompt"):
        parse_prompts(" \n# only a comment\n")
    with pytest.raises(UserError, match="at most 16"):
        parse_prompts("\n".join(f"prompt {i}" for i in range(17)))
    assert parse_seeds("0, 1 2;4294967295") == [0, 1, 2, 2**32 - 1]
    for bad in ("-5", "1.5", "abc", "18446744073709551616", "99999999999999999999", "١"):
        with pytest.raises(UserError, match="whole numbers from 0 to"):
            parse_seeds(bad)
    with pytest.raises(UserError, match="at least one seed"):
        parse_seeds(" , ")
    with pytest.raises(UserError, match="at most 8"):
        parse_seeds(",".join(map(str, range(9))))


def test_limits_are_refused_before_the_model_loads(tmp_path, tiny_model):
    runs = tmp_path / "runs"
    runs.mkdir()
    app = PreviewApp(AppSettings(models=[tiny_model], runs=runs))

    def grid(**kwargs):
        args = dict(model=tiny_model, prompts="a cat", seeds="0", paths=[], scales=[]) | kwargs
        return prompt_grid(app, args.pop("model"), args.pop("prompts"), args.pop("seeds"), args.pop("paths"), args.pop("scales"), **args)

    many = "\n".join(f"prompt {i}" for i in range(9))
    with pytest.raises(UserError, match=f"72 images .* at most {MAX_IMAGES}"):
        grid(prompts=many, seeds="0,1,2,3,4,5,6,7")
    with pytest.raises(UserError, match="at least one prompt"):
        grid(prompts="")
    with pytest.raises(UserError, match="whole numbers"):
        grid(seeds="-5")
    with pytest.raises(UserError, match="nothing to draw"):
        grid(base=False)
    with pytest.raises(UserError, match="this app may read"):
        grid(paths=[str(tmp_path)], scales=[1.0])
    with pytest.raises(UserError, match="whole number"):
        grid(steps=2.5)
    with pytest.raises(UserError, match="steps must be 1 to"):
        grid(steps=100000)
    with pytest.raises(UserError, match="finite"):
        grid(guidance=float("nan"))
    assert app.holder.loaded is None  # every refusal came before the model was touched
    with pytest.raises(UserError, match="multiple of"):
        grid(bucket="100x100", steps=1)


def test_the_grid_holds_the_sample_verbs_images_and_its_parameters(tmp_path, tiny_model):
    runs = tmp_path / "runs"
    adapter = make_adapter(tiny_model, runs / "style-a" / "final", seed=1)
    app = PreviewApp(AppSettings(models=[tiny_model], runs=runs))
    seen: list[tuple[float, str]] = []
    grid = prompt_grid(
        app, tiny_model, "\n".join(PROMPTS), ", ".join(map(str, SEEDS)), [str(adapter)], [0.8], negative="blurry",
        steps=2, guidance=4.5, bucket="256x256", progress=lambda fraction, desc: seen.append((fraction, desc)),
    )

    # The sample verb, same prompts, seeds, steps, size and adapter: the same pixels.
    result = sample(SampleConfig(
        model=tiny_model, prompts=PROMPTS, seeds=SEEDS, negative_prompt="blurry", steps=2, size="256x256",
        adapters=[f"{adapter}:0.8"], out=str(tmp_path / "samples"),
    ))
    columns = len(PROMPTS) * len(SEEDS)
    images = [Image.open(p).convert("RGB") for p in result.images]
    drawn = [images[:columns], images[columns:]]  # rows: base, then the adapter
    assert np.abs(np.asarray(drawn[0][0], float) - np.asarray(drawn[1][0], float)).mean() > 2.0, "the adapter changed nothing"
    expected = layout(drawn, ["base", "style-a/final x0.8"], PROMPTS, SEEDS)
    assert grid.image.size == expected.size
    assert np.array_equal(np.asarray(grid.image), np.asarray(expected))
    # ... and each prompt's block is the sample verb's own grid function.
    with Image.open(result.grid) as written:
        own, _ = comparison_grid(drawn, ["base", "final x0.8"], [(p, s) for p in PROMPTS for s in SEEDS])
        assert np.array_equal(np.asarray(written.convert("RGB")), np.asarray(own))
    assert app.holder.loaded == tiny_model  # drawn by the app's one loaded model

    # The PNG in the outputs folder, with its parameters as save_png writes them.
    assert grid.path.parent == app.settings.outputs / "grids" and grid.path.suffix == ".png"
    with Image.open(grid.path) as png:
        parameters = json.loads(png.text["pixart-tune"])
        assert "Negative prompt: blurry" in png.text["parameters"]
        assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(grid.image))
    assert parameters == grid.parameters
    assert parameters["prompts"] == PROMPTS and parameters["seeds"] == SEEDS and parameters["steps"] == 2
    assert (parameters["height"], parameters["width"], parameters["guidance"]) == (256, 256, 4.5)
    assert parameters["model"] == tiny_model
    assert parameters["adapters"] == [{"path": str(adapter.resolve()), "scale": 0.8}]
    assert parameters["rows"] == ["base", "style-a/final x0.8"]

    # Step-level progress, named after the image being drawn.
    descs = [desc for _, desc in seen]
    assert "base: prompt 1/2, seed 3: step 1/2" in descs
    assert "style-a/final x0.8: prompt 2/2, seed 5: step 2/2" in descs
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0

    # A second grid gets a new name; the first stays.
    again = prompt_grid(app, tiny_model, PROMPTS[0], "3", [], [], steps=1, bucket="")
    assert again.path != grid.path and grid.path.is_file()
    assert again.image.width == expected.width - 256 - 7 * len("style-a/final x0.8") + 7 * len("base")
