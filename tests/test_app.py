"""The app's file safety, adapter discovery and actions, without a browser.

The path guard is what keeps a user (or anyone reaching the port) from reading or
writing outside the folders the app was started with; these tests try the
escapes that matter: absolute paths, ``..``, and symlinks.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pixart_tune.app import (
    AppSettings,
    PathGuard,
    PreviewApp,
    discover_adapters,
    discover_models,
    launch_kwargs,
    output_path,
    settings_from_env,
)
from pixart_tune.app.service import parse_bucket, parse_scales
from pixart_tune.errors import UserError


def make_adapter(model: str, out: Path, seed: int, std: float = 0.3, targets: str = "attention") -> Path:
    """A real PEFT adapter for the tiny model, with seeded random weights big enough to change its images."""
    from pixart_tune.adapters.lora import LoraSettings, inject_lora, save_adapter
    from pixart_tune.models import load_transformer

    settings = LoraSettings(rank=4, alpha=4.0, targets=targets)
    transformer = inject_lora(load_transformer(model), settings)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return save_adapter(transformer, out, settings, metadata={"seed": seed})


@pytest.fixture(scope="module")
def adapter_source(tiny_model, tmp_path_factory) -> Path:
    """One adapter folder, built once and copied into each test's runs folder."""
    return make_adapter(tiny_model, tmp_path_factory.mktemp("adapters") / "a", seed=1)


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# --------------------------------------------------------------------------- path guard


def test_guard_allows_paths_inside_and_resolves_relative_ones(tmp_path):
    root = tmp_path / "runs"
    (root / "style" / "final").mkdir(parents=True)
    guard = PathGuard([root])
    assert guard.check(root / "style" / "final") == (root / "style" / "final").resolve()
    # Relative paths are looked up under the allowed folders.
    assert guard.check("style/final") == (root / "style" / "final").resolve()
    assert guard.check(f"{root}/style/../style/final") == (root / "style" / "final").resolve()


def test_guard_refuses_outside_paths_and_dotdot_escapes(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"x")
    guard = PathGuard([root])
    with pytest.raises(UserError, match="this app may read"):
        guard.check(secret)
    with pytest.raises(UserError, match="this app may read"):
        guard.check(f"{root}/../secret.safetensors")
    with pytest.raises(UserError, match="this app may read"):
        guard.check("../secret.safetensors")
    with pytest.raises(UserError, match="this app may read"):
        guard.check("/etc/passwd")
    with pytest.raises(UserError, match="not found"):
        guard.check(root / "nothing-here")
    assert not guard.allows(tmp_path)
    # A sibling whose name starts like the root is not inside it.
    (tmp_path / "runs-other").mkdir()
    assert not guard.allows(tmp_path / "runs-other")


def test_guard_refuses_symlink_escapes(tmp_path):
    root, outside = tmp_path / "runs", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "lora.safetensors").write_bytes(b"x")
    (root / "link-file.safetensors").symlink_to(outside / "lora.safetensors")
    (root / "link-dir").symlink_to(outside, target_is_directory=True)
    (root / "inner").mkdir()
    (root / "link-inside").symlink_to(root / "inner", target_is_directory=True)
    guard = PathGuard([root])
    for escape in ("link-file.safetensors", root / "link-file.safetensors", root / "link-dir", root / "link-dir" / "lora.safetensors"):
        with pytest.raises(UserError, match="this app may read"):
            guard.check(escape)
    # A link that stays inside the allowed folders is fine.
    assert guard.check(root / "link-inside") == (root / "inner").resolve()


def test_output_names_cannot_escape_or_overwrite(tmp_path):
    (tmp_path / "taken").mkdir()
    assert output_path(tmp_path, "style-mix_v2.1") == tmp_path.resolve() / "style-mix_v2.1"
    for bad in ("../x", "a/b", "/abs", "..", ".hidden", "", "a\\b", "x" * 100):
        with pytest.raises(UserError, match="plain folder name"):
            output_path(tmp_path, bad)
    with pytest.raises(UserError, match="already exists"):
        output_path(tmp_path, "taken")


# --------------------------------------------------------------------------- discovery


def test_discovery_finds_adapters_and_skips_the_rest(tmp_path, adapter_source):
    runs, outside = tmp_path / "runs", tmp_path / "outside"
    peft = _copy(adapter_source, runs / "style" / "final")
    loose = runs / "exports" / "style-comfy.safetensors"
    loose.parent.mkdir(parents=True)
    save_file({"transformer.x.lora_A.weight": torch.zeros(2, 2)}, str(loose))
    save_file({"not_a_lora.weight": torch.zeros(2)}, str(runs / "exports" / "other.safetensors"))
    (runs / "exports" / "broken.safetensors").write_bytes(b"not safetensors")
    _copy(adapter_source, runs / ".style.tmp")  # a half-written output
    fused = runs / "merged" / "fused-model"
    fused.mkdir(parents=True)
    (fused / "model_index.json").write_text("{}")
    save_file({"a.lora_A.weight": torch.zeros(1)}, str(fused / "inside-a-model.safetensors"))
    outside.mkdir()
    save_file({"a.lora_A.weight": torch.zeros(1)}, str(outside / "escape.safetensors"))
    (runs / "escape.safetensors").symlink_to(outside / "escape.safetensors")
    (runs / "escape-dir").symlink_to(outside, target_is_directory=True)

    guard = PathGuard([runs])
    assert discover_adapters([runs], guard) == [loose.resolve(), peft.resolve()]
    assert discover_models(runs / "merged", guard) == [fused.resolve()]


def test_settings_and_launch_are_safe_by_default(tmp_path, tiny_model):
    with pytest.raises(UserError, match="runs folder"):
        AppSettings(models=[tiny_model], runs=tmp_path / "missing")
    settings = AppSettings(models=[tiny_model], runs=tmp_path)
    kwargs = launch_kwargs(settings)
    assert kwargs["server_name"] == "127.0.0.1" and kwargs["share"] is False
    assert kwargs["allowed_paths"] == [str(tmp_path.resolve() / "merged")]
    assert Path(tiny_model).resolve() in settings.roots


def test_model_choice_is_checked(tmp_path, tiny_model):
    runs = tmp_path / "runs"
    (runs / "not-a-model").mkdir(parents=True)
    app = PreviewApp(AppSettings(models=[tiny_model], runs=runs))
    assert app.check_model(tiny_model) == tiny_model
    with pytest.raises(UserError, match="not a diffusers pipeline"):
        app.check_model(str(runs / "not-a-model"))
    with pytest.raises(UserError, match="this app may read"):
        app.check_model(str(tmp_path))
    with pytest.raises(UserError, match="--allow-hub"):
        app.check_model("someone/some-model")
    with pytest.raises(UserError, match="pickle"):
        (runs / "x.ckpt").write_bytes(b"x")
        app.check_adapter("x.ckpt")


def test_parsers_say_what_to_write():
    assert parse_bucket("256x512") == (256, 512)
    assert parse_scales("0, 0.5 1;1.5") == [0.0, 0.5, 1.0, 1.5]
    with pytest.raises(UserError, match="HEIGHTxWIDTH"):
        parse_bucket("square")
    with pytest.raises(UserError, match="numbers separated"):
        parse_scales("0, half")
    with pytest.raises(UserError, match="between 2 and 8"):
        parse_scales("1")


# --------------------------------------------------------------------------- actions on the tiny model


def test_compare_sweep_and_merge_on_the_tiny_model(tmp_path, tiny_model, adapter_source):
    runs = tmp_path / "runs"
    a = _copy(adapter_source, runs / "a" / "final")
    b = make_adapter(tiny_model, runs / "b" / "final", seed=2)
    app = PreviewApp(AppSettings(models=[tiny_model], runs=runs))
    bucket = "256x256"
    args = (tiny_model, "a photo of a cat", "", 3, 2, 4.5, bucket)

    base, adapted = app.compare(*args, [str(a)], [1.0])
    assert base.size == adapted.size == (256, 256)
    assert np.abs(np.asarray(base, float) - np.asarray(adapted, float)).mean() > 2.0
    sampler = app.holder.get(tiny_model)

    # Scale 0 is the base model, scale 1 the adapted one: same seed, same noise.
    grid = np.asarray(app.sweep(*args, [str(a), str(b)], [1.0, 0.0], str(a), "0, 1"), float)
    assert grid.shape[1] == 2 * 256
    assert app.holder.get(tiny_model) is sampler  # the model stays loaded between calls
    assert np.abs(grid[-256:, :256] - np.asarray(base, float)).max() <= 2
    assert np.abs(grid[-256:, 256:] - np.asarray(adapted, float)).max() <= 2

    merged = app.merge(tiny_model, [str(a), str(b)], [0.5, 0.5], "cat", 8, "mix")
    assert merged == runs.resolve() / "merged" / "mix"
    assert str(merged) in [value for _, value in app.adapter_choices()]
    with pytest.raises(UserError, match="already exists"):
        app.merge(tiny_model, [str(a), str(b)], [0.5, 0.5], "cat", 8, "mix")
    with pytest.raises(UserError, match="this app may read"):
        app.merge(tiny_model, [str(a), str(tmp_path)], [0.5, 0.5], "cat", 8, "mix2")
    assert not (runs / "merged" / "mix2").exists()
    with pytest.raises(UserError, match="svd rank 0 is out of range"):
        app.merge(tiny_model, [str(a), str(b)], [1.0, 1.0], "svd", 0, "low")
    assert (app.merge(tiny_model, [str(a), str(b)], [1.0, 1.0], "svd", 2, "low") / "adapter_model.safetensors").is_file()
    merged_grid = np.asarray(app.sweep(*args, [str(merged)], [1.0], str(merged), "0, 1"), float)
    both_grid = np.asarray(app.sweep(*args, [str(a), str(b)], [0.5, 0.5], str(a), "0, 0.5"), float)
    assert np.abs(merged_grid[-256:, 256:] - both_grid[-256:, 256:]).mean() < 1.0

    # Fusing writes a model folder that the model menu offers and the app may load.
    fused = app.merge(tiny_model, [str(a)], [1.0], "fuse", 8, "fused")
    assert fused == runs.resolve() / "merged" / "fused"
    assert str(fused) in [value for _, value in app.model_choices()]
    assert str(fused) not in [value for _, value in app.adapter_choices()]
    fused_base, _ = app.compare(str(fused), *args[1:], [], [])
    assert np.abs(np.asarray(fused_base, float) - np.asarray(adapted, float)).mean() < 1.0


def test_settings_from_the_environment(tmp_path, tiny_model):
    settings = settings_from_env({"PIXART_TUNE_MODEL": f"{tiny_model}, org/other", "PIXART_TUNE_RUNS": str(tmp_path / "runs")})
    assert settings.models == [tiny_model, "org/other"]
    assert settings.runs == (tmp_path / "runs").resolve() and settings.outputs == settings.runs / "merged"
    assert settings.host == "127.0.0.1" and settings.share is False


def test_app_py_launcher_explains_itself_and_refuses_a_missing_model(tmp_path):
    """The Spaces-style launcher: --help prints its variables; a bad model is a message, not a traceback."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo), HF_HUB_OFFLINE="1")
    shown = subprocess.run([sys.executable, str(repo / "app.py"), "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert shown.returncode == 0 and "PIXART_TUNE_MODEL" in shown.stdout
    env.update(PIXART_TUNE_MODEL=str(tmp_path / "no_model"), PIXART_TUNE_RUNS=str(tmp_path / "runs"))
    refused = subprocess.run([sys.executable, str(repo / "app.py")], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert refused.returncode == 1, refused.stderr[-2000:]
    assert "app.py: error:" in refused.stderr and "Traceback" not in refused.stderr


def test_an_adapter_folder_whose_files_lead_outside_is_refused(tmp_path, tiny_model, adapter_source):
    """The folder is inside the runs folder, but its weights are a link to a file outside."""
    runs, outside = tmp_path / "runs", tmp_path / "outside"
    _copy(adapter_source, outside)
    planted = runs / "planted"
    planted.mkdir(parents=True)
    (planted / "adapter_config.json").write_bytes((outside / "adapter_config.json").read_bytes())
    (planted / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    app = PreviewApp(AppSettings(models=[tiny_model], runs=runs))
    with pytest.raises(UserError, match="this app may read"):
        app.check_adapter("planted")
    assert app.check_adapter(_copy(adapter_source, runs / "fine")) == (runs / "fine").resolve()


def test_two_tabs_merging_to_one_name_keep_the_first(tmp_path, tiny_model, adapter_source):
    """Started together: one merge is written, the other is refused, none replaces the other."""
    import threading

    runs = tmp_path / "runs"
    a = _copy(adapter_source, runs / "a")
    b = make_adapter(tiny_model, runs / "b", seed=2)
    app = PreviewApp(AppSettings(models=[tiny_model], runs=runs))
    start, results = threading.Barrier(2), []

    def merge(weight: float) -> None:
        start.wait()
        try:
            results.append(app.merge(tiny_model, [str(a), str(b)], [weight, 1.0], "cat", 8, "mix"))
        except UserError as error:
            results.append(error)

    threads = [threading.Thread(target=merge, args=(w,)) for w in (0.5, 0.7)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(type(r).__name__ for r in results) == ["PosixPath", "UserError"]
    assert "already exists" in str(next(r for r in results if isinstance(r, UserError)))


def test_a_model_folder_with_a_link_leading_outside_is_refused(tmp_path, tiny_model):
    """Fusing copies the model folder's files into the served outputs folder: no file may come from outside."""
    import shutil

    runs, outside = tmp_path / "runs", tmp_path / "outside"
    shutil.copytree(tiny_model, runs / "model")
    outside.mkdir()
    (outside / "secret.txt").write_text("private")
    (runs / "model" / "scheduler" / "notes.txt").symlink_to(outside / "secret.txt")
    app = PreviewApp(AppSettings(models=[tiny_model], runs=runs))
    with pytest.raises(UserError, match="this app may read"):
        app.check_model(str(runs / "model"))
    (runs / "model" / "scheduler" / "notes.txt").unlink()
    assert app.check_model(str(runs / "model")) == str((runs / "model").resolve())


# --------------------------------------------------------------------------- honest controls (issue 14)


def test_outside_paths_are_refused_alike_whatever_is_there(tmp_path):
    """A refusal says nothing of the machine: an existing file, a missing one, a link out and a broken link read the same."""
    root, outside = tmp_path / "runs", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "real.safetensors").write_bytes(b"x")
    (root / "out-link").symlink_to(outside / "real.safetensors")
    (root / "broken-link").symlink_to(outside / "gone.safetensors")
    guard = PathGuard([root])
    messages = {}
    for text in (str(outside / "real.safetensors"), str(outside / "missing.safetensors"), "/etc/passwd", "/no/such/file", "out-link", "broken-link"):
        with pytest.raises(UserError) as refused:
            guard.check(text, "adapter")
        messages[text] = str(refused.value).replace(repr(text), "PATH")
        assert "not an adapter this app may read" in str(refused.value)
        assert str(outside) not in str(refused.value).replace(repr(text), "")
    assert len(set(messages.values())) == 1, messages


def test_values_out_of_range_are_refused_with_the_range(tmp_path, tiny_model, adapter_source):
    runs = tmp_path / "runs"
    a = _copy(adapter_source, runs / "a" / "final")
    app = PreviewApp(AppSettings(models=[tiny_model], runs=runs))
    args = (tiny_model, "a cat", "")
    cases = {
        (None, 2, 4.5, 1.0): "seed is empty or not a number: write a whole number from 0 to 4294967295",
        (99999999999999999999, 2, 4.5, 1.0): "seed 99999999999999999999 is out of range: write a whole number from 0 to 4294967295",
        (-5, 2, 4.5, 1.0): "seed -5 is out of range",
        (0, 100000, 4.5, 1.0): "steps 100000 is out of range: write a whole number from 1 to 100",
        (0, 2, 4.5, 50): "adapter scale 50 is out of range: write a number from -2 to 2",
        (0, 2, float("nan"), 1.0): "guidance nan is out of range",
    }
    for (seed, steps, guidance, scale), message in cases.items():
        with pytest.raises(UserError) as refused:
            app.compare(*args, seed, steps, guidance, "256x256", [str(a)], [scale])
        assert message in str(refused.value)
    for values, message in {"1e9, 1": r"sweep scale 1e\+09 is out of range", "": "give between 2 and 8 scales", "half, one": "numbers separated"}.items():
        with pytest.raises(UserError, match=message):
            app.sweep(*args, 0, 2, 4.5, "256x256", [str(a)], [1.0], str(a), values)


def test_generate_reports_steps_and_shows_the_base_image_first(tmp_path, tiny_model, adapter_source):
    runs = tmp_path / "runs"
    a = _copy(adapter_source, runs / "a" / "final")
    app = PreviewApp(AppSettings(models=[tiny_model], runs=runs))
    said = []
    results = app.compare_steps(tiny_model, "a cat", "", 1, 3, 4.5, "256x256", [str(a)], [1.0], lambda f, desc="": said.append(desc))
    base, adapted = next(results)
    assert base is not None and adapted is None  # shown before the adapted image is drawn
    assert said[-1] == "base model: step 3/3" and not any(d.startswith("with adapters") for d in said)
    base_again, adapted = next(results)
    assert base_again is base and adapted is not None
    assert [d for d in said if ":" in d] == [f"{part}: step {i}/3" for part in ("base model", "with adapters") for i in (1, 2, 3)]

    said.clear()
    grid = app.sweep(tiny_model, "a cat", "", 1, 2, 4.5, "256x256", [str(a)], [1.0], str(a), "0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 2",
                     lambda f, desc="": said.append(desc))
    assert "scale 1.5: step 2/2" in said and said[-1] == "scale 2: step 2/2"
    # 8 scales wrap into 2 rows of 4, each tile under its own label, the grid padded on top.
    assert grid.size[0] == 4 * 256 and 2 * 256 < grid.size[1] < 2 * 256 + 140
    assert np.asarray(grid)[:30].min() == 255  # nothing drawn where the image's badge sits


def test_adapters_are_grouped_under_their_run(tmp_path, tiny_model, adapter_source):
    runs = tmp_path / "runs"
    app = PreviewApp(AppSettings(models=[tiny_model], runs=runs.mkdir() or runs))
    assert "pixart-tune train" in app.adapters_note() and str(runs.resolve()) in app.adapters_note()
    for step in (100, 500, 1000):
        _copy(adapter_source, runs / "style-a" / "checkpoints" / f"step-{step:06d}" / "adapter")
    _copy(adapter_source, runs / "style-a" / "adapter")
    _copy(adapter_source, runs / "old" / "final")
    _copy(adapter_source, runs / "zeta" / "checkpoints" / "step-000050" / "adapter")
    labels = [label for label, _ in app.adapter_choices()]
    assert labels == ["runs/old/final", "style-a / final", "style-a / step 1000", "style-a / step 500", "style-a / step 100", "zeta / step 50"]
    assert app.adapters_note() == ""


def test_merge_defaults_to_exact_clamps_the_svd_rank_visibly_and_names_the_download(tmp_path, tiny_model, adapter_source):
    from pixart_tune.adapters.merge import MergeConfig
    from pixart_tune.app.service import DEFAULT_METHOD

    assert DEFAULT_METHOD == "cat" and MergeConfig(adapters=["a"], out="o").method == "cat"
    runs = tmp_path / "runs"
    a = _copy(adapter_source, runs / "a" / "final")
    b = make_adapter(tiny_model, runs / "b" / "final", seed=2)
    app = PreviewApp(AppSettings(models=[tiny_model], runs=runs))
    out, notes = app.merge_noted(tiny_model, [str(a), str(b)], [1.0, 1.0], "svd", 1000000, "big")
    assert notes == ["svd rank 1000000 is above the adapters' combined rank 8: using 8 (exact)"]
    with pytest.raises(UserError, match="svd rank 0 is out of range"):
        app.merge(tiny_model, [str(a), str(b)], [1.0, 1.0], "svd", 0, "zero")
    with pytest.raises(UserError, match="svd needs a rank"):
        app.merge(tiny_model, [str(a), str(b)], [1.0, 1.0], "svd", None, "none")
    download = app.download(out)
    assert download.name == "big.safetensors" and download.read_bytes() == (out / "adapter_model.safetensors").read_bytes()
    assert (out / "adapter_model.safetensors").is_file()  # the PEFT folder keeps its own file name
    assert str(download) not in [value for _, value in app.adapter_choices()]
    # Mixed ranks: linear is refused in the page's words, not the command line's.
    c = _copy(adapter_source, runs / "c" / "final")
    from pixart_tune.adapters.lora import LoraSettings, inject_lora, save_adapter
    from pixart_tune.models import load_transformer

    d = save_adapter(inject_lora(load_transformer(tiny_model), LoraSettings(rank=2, alpha=2.0, targets="attention")), runs / "d", LoraSettings(rank=2, alpha=2.0, targets="attention"))
    with pytest.raises(UserError) as refused:
        app.merge(tiny_model, [str(c), str(d)], [1.0, 1.0], "linear", 8, "lin")
    assert 'pick "cat" (exact) or "svd" in the Method list' in str(refused.value) and "--" not in str(refused.value)
