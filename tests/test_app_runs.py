"""The Runs tab's reading of run folders: a real tiny training run, then damaged, linked and odd folders."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from pixart_tune.app.files import PathGuard
from pixart_tune.app.runs import (
    RunInfo,
    find_run,
    is_run,
    list_runs,
    load_image,
    lowest_text,
    read_run,
    summary_text,
)
from pixart_tune.errors import UserError
from pixart_tune.training.plots import EVAL, TRAIN, LossHistory, lowest_eval
from tests.training_fixtures import red_dataset, tiny_config  # noqa: F401  (fixture)

# Validation and evaluation every 2 of 6 steps, one image in two held out, a checkpoint every 2 steps.
RUN_OVERRIDES = [
    "schedule.steps=6", "schedule.warmup_steps=0", "logging.every=1",
    "validation.every=2", "validation.prompts=['a photo of a red cat']", "validation.seeds=[0, 1]", "validation.steps=2",
    "data.eval_fraction=0.5", "evaluation.every=2", "checkpoint.every=2", "checkpoint.keep_last=5",
]


@pytest.fixture(scope="session")
def trained_run(tiny_model, red_dataset, tmp_path_factory) -> Path:  # noqa: F811
    """A real tiny training run (a few seconds on a CPU): grids, held-out losses and checkpoints every 2 steps."""
    from pixart_tune.training.trainer import run

    out = tmp_path_factory.mktemp("trained") / "red-style"
    run(tiny_config(tiny_model, red_dataset, out, *RUN_OVERRIDES), progress=False)
    return out


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


# --------------------------------------------------------------------------- a real run


def test_a_real_run_is_read_whole(trained_run):
    runs = list_runs(trained_run.parent)
    assert [r.name for r in runs] == ["red-style"]
    run = runs[0]
    assert run.notes == []
    # The config as written, comments and order kept: the text, not a re-dump.
    assert run.config == (trained_run / "config.yaml").read_text(encoding="utf-8")
    assert yaml.safe_load(run.config)["schedule"]["steps"] == 6
    stored = json.loads((trained_run / "loss.json").read_text())
    assert run.history[TRAIN] == [tuple(p) for p in stored[TRAIN]]
    assert [step for step, _ in run.history[EVAL]] == [0, 2, 4, 6]
    assert [g.step for g in run.grids] == [2, 4, 6]
    assert run.base_grid == (trained_run / "samples" / "base.png").resolve()
    # The final adapter, then the checkpoints latest first (the last step is the final adapter, not a checkpoint).
    assert [a.label for a in run.adapters] == ["final", "step 4", "step 2"]
    assert run.adapters[1].path == (trained_run / "checkpoints" / "step-000004" / "adapter").resolve()
    assert run.lowest == lowest_eval(LossHistory.load(trained_run, 10**9))
    assert run.last_step == 6
    assert "**red-style** · last step 6 · 3 validation grids · 2 checkpoints and the final adapter" in summary_text(run)
    assert lowest_text(run).startswith(f"Lowest held-out loss: **{run.lowest[1]:.4g}** at step {run.lowest[0]}")


def test_the_grid_slider_finds_the_grid_at_or_before_a_step(trained_run):
    run = read_run(trained_run)
    assert [run.grid_at(s).step for s in (0, 2, 3, 4, 5.5, 6, 99)] == [2, 2, 2, 4, 4, 6, 6]
    assert run.grid_at(None).step == 6
    assert RunInfo("empty", trained_run, 0.0).grid_at(4) is None
    image = load_image(run.grid_at(4).path, PathGuard([trained_run]))
    assert image.mode == "RGB" and image.size == load_image(run.base_grid, PathGuard([trained_run])).size


def test_runs_are_listed_newest_first_nested_and_only_runs(trained_run, tmp_path, tiny_model):
    from tests.test_app import make_adapter

    root = tmp_path / "runs"
    old = copy_run(trained_run, root / "old")
    new = copy_run(trained_run, root / "project" / "new")
    os.utime(old / "loss.json", (1_000_000, 1_000_000))
    for path in (old, old / "config.yaml", old / "checkpoints", old / "samples", old / "adapter"):
        os.utime(path, (1_000_000, 1_000_000))
    make_adapter(tiny_model, root / "style-a" / "final", seed=1)  # an adapter folder, not a run
    (root / "merged" / ".gradio-cache").mkdir(parents=True)  # the outputs folder
    (root / ".hidden-run").mkdir()
    (root / ".hidden-run" / "config.yaml").write_text("seed: 0\n")
    assert [r.name for r in list_runs(root)] == ["project/new", "old"]
    # A checkpoint holds a config.yaml too: it is part of its run, not a run.
    assert all("checkpoints" not in r.name for r in list_runs(root))
    assert find_run(root, "project/new").path == new.resolve()


def test_a_run_still_starting_is_a_run(tmp_path):
    run = tmp_path / "runs" / "starting"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\nschedule:\n  steps: 10\n")
    [info] = list_runs(tmp_path / "runs")
    assert (info.history, info.grids, info.adapters, info.base_grid, info.notes) == ({}, [], [], None, [])
    assert "no step logged yet" in summary_text(info) and "(no final adapter yet)" in summary_text(info)
    assert lowest_text(info).startswith("No held-out loss")


# --------------------------------------------------------------------------- damaged folders


def test_damaged_files_give_notes_never_exceptions(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "runs" / "damaged")
    (run / "loss.json").write_text('{"train": [[1, 0.5], [2, ')  # cut off mid-write
    (run / "config.yaml").write_text("schedule: {steps: [6\n")
    (run / "samples" / "step-000004.png").write_bytes(b"\x89PNG\r\n half")
    shutil.rmtree(run / "checkpoints" / "step-000002" / "adapter")  # a checkpoint without its adapter
    (run / "checkpoints" / ".step-000008.tmp").mkdir()  # one being written
    (run / "adapter" / "adapter_config.json").unlink()  # a final adapter being written
    info = read_run(run)
    assert info.history == {} and info.lowest is None
    assert info.config == "schedule: {steps: [6\n"
    assert info.notes == ["config.yaml: not valid YAML (half-written?); shown as it is", "loss.json: not JSON (half-written?); no curves"]
    assert [a.label for a in info.adapters] == ["step 4"]
    notes: list[str] = []
    assert load_image(info.grid_at(4).path, PathGuard([run]), notes) is None
    assert notes == ["step-000004.png: not a readable image (half-written?)"]
    summary_text(info)
    lowest_text(info)


def test_odd_loss_histories_keep_their_good_points(tmp_path):
    run = tmp_path / "odd"
    run.mkdir()
    (run / "loss.json").write_text(json.dumps({"train": [[2, 0.5], [1, 0.7], ["x", 1], [3, "nan"], [4]], "eval": "no", "other": [[1, 2]]}))
    info = read_run(run)
    assert info.history == {"train": [(1, 0.7), (2, 0.5)], "other": [(1, 2.0)]}
    assert info.notes == ["loss.json: 4 points not numbers (or not finite) left out"]
    (run / "loss.json").write_text("[1, 2]")
    assert read_run(run).notes == ["loss.json: not a loss history; no curves"]
    (run / "loss.json").write_bytes(b"\xff\xfe\x00")
    assert read_run(run).notes == ["loss.json: not UTF-8 text"]
    (run / "loss.json").write_text("{}")
    (run / "config.yaml").write_text("- just\n- a list\n")
    assert read_run(run).notes == ["config.yaml: not a recipe (no keys); shown as it is"]


def test_an_over_fitting_run_says_so():
    info = RunInfo("r", Path("."), 0.0, history={EVAL: [(0, 1.0), (2, 0.5), (4, 0.6)]})
    info.lowest = lowest_eval(LossHistory(Path("loss.json"), info.history))
    assert lowest_text(info) == ("Lowest held-out loss: **0.5** at step 2; the last evaluation is 20% higher: "
                                 "over-fitting after it, the checkpoint nearest step 2 generalises best.")
    info = RunInfo("r", Path("."), 0.0, history={EVAL: [(0, 1.0)]})
    assert lowest_text(info).startswith("Held-out loss measured once")


def test_an_ema_run_offers_both_final_adapters(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "ema")
    shutil.copytree(run / "adapter", run / "adapter_raw")
    assert [a.label for a in read_run(run).adapters] == ["final", "final, before EMA", "step 4", "step 2"]


# --------------------------------------------------------------------------- the path guard


def test_links_out_of_the_runs_folder_are_not_followed(trained_run, tmp_path):
    outside = tmp_path / "outside"
    secret_run = copy_run(trained_run, outside / "secret-run")
    root = tmp_path / "runs"
    run = copy_run(trained_run, root / "linked")
    (root / "alias").symlink_to(secret_run, target_is_directory=True)  # a whole run linked in
    (run / "loss.json").unlink()
    (run / "loss.json").symlink_to(secret_run / "loss.json")
    (run / "samples" / "step-000008.png").symlink_to(secret_run / "samples" / "step-000002.png")
    shutil.rmtree(run / "checkpoints" / "step-000002")
    (run / "checkpoints" / "step-000002").symlink_to(secret_run / "checkpoints" / "step-000002", target_is_directory=True)
    guard = PathGuard([root])
    assert [r.name for r in list_runs(root, guard)] == ["linked"]
    info = find_run(root, "linked", guard)
    assert info.history == {}
    assert info.notes == ["loss.json: not read (not a file inside the runs folder)"]
    assert [g.step for g in info.grids] == [2, 4, 6]
    assert [a.label for a in info.adapters] == ["final", "step 4"]
    assert load_image(secret_run / "samples" / "base.png", guard) is None
    # Refusals name what was asked for, never where anything is.
    for name in ("alias", "../outside/secret-run", str(secret_run), "linked/../../outside/secret-run", "style/missing", "", "linked/samples"):
        with pytest.raises(UserError) as refused:
            find_run(root, name, guard)
        assert str(tmp_path) not in str(refused.value).replace(name, "")
    assert is_run(secret_run)
