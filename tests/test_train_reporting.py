"""What a run reports: TensorBoard and wandb (offline) events, loss.json / loss.png, the end-of-run summary, the model card.

One run of the real ``pixart-tune train`` (a subprocess, both trackers on, half the
images held out, validation with a tiny CLIP, EMA on) is shared by most tests; each
reads back what a person would open: the event files with TensorBoard's own reader,
the offline wandb run from its transaction log, the published README.md.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from pixart_tune.base import LOSS_HISTORY, LOSS_PLOT
from pixart_tune.errors import UserError
from pixart_tune.training import plots
from pixart_tune.training.outputs import describe_outputs
from tests.clip_fixtures import tiny_clip  # noqa: F401  (fixture)
from tests.conftest import REPO
from tests.training_fixtures import TINY_RECIPE, cli_env, red_dataset, tiny_config  # noqa: F401  (fixture)

STEPS = 4
PROMPT = "a flat red colour"
# red_dataset keeps two images: one trains, one is held out.
REPORTED = ["logging.report_to=[tensorboard,wandb]", "logging.every=1", f"schedule.steps={STEPS}", "schedule.warmup_steps=0",
            "checkpoint.every=0", "data.eval_fraction=0.5", "evaluation.every=2", "evaluation.timesteps=[100,500,900]",
            "validation.every=2", f"validation.prompts=[{PROMPT}]", "validation.seeds=[0]", "validation.steps=2",
            "ema.enabled=true", "ema.decay=0.5"]


def _wandb_env(root: Path) -> dict[str, str]:
    """An offline wandb whose every file stays under ``root``."""
    home = root / "wandb-home"
    return {"WANDB_MODE": "offline", "WANDB_DIR": str(root), "WANDB_CONFIG_DIR": str(home), "WANDB_CACHE_DIR": str(home),
            "WANDB_DATA_DIR": str(home)}


@pytest.fixture(scope="module")
def reported(tiny_model, red_dataset, tiny_clip, tmp_path_factory):  # noqa: F811
    """(output_dir, console) of ``pixart-tune train`` with TensorBoard and an offline wandb run."""
    root = tmp_path_factory.mktemp("reported")
    out = root / "run"
    env = dict(cli_env(), HF_HUB_OFFLINE="1", **_wandb_env(root))
    # Not WANDB_SILENT: the trainer itself must keep wandb's banner off the console.
    env.pop("WANDB_SILENT", None)
    command = [sys.executable, "-m", "pixart_tune.cli", "train", str(TINY_RECIPE), f"model={tiny_model}", f"data.path={red_dataset}",
               f"output_dir={out}", *REPORTED, f"validation.clip_model={tiny_clip}", "--no-progress"]
    done = subprocess.run(command, check=False, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    return out, done.stdout


def _same(points: list[tuple[int, float]], expected: list[tuple[int, float]], rel: float) -> None:
    """The same steps, and values within ``rel`` (TensorBoard keeps float32)."""
    assert [step for step, _ in points] == [step for step, _ in expected]
    assert [value for _, value in points] == pytest.approx([value for _, value in expected], rel=rel)


def _history(out: Path) -> dict[str, list[tuple[int, float]]]:
    return {name: [(int(s), float(v)) for s, v in points] for name, points in json.loads((out / LOSS_HISTORY).read_text()).items()}


# --------------------------------------------------------------------------- TensorBoard


def test_tensorboard_holds_the_losses_the_lr_the_grids_and_the_recipe(reported):
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.plugins.hparams import plugin_data_pb2

    out, _ = reported
    history = _history(out)
    events = ea.EventAccumulator(str(out / "logs"), size_guidance={ea.SCALARS: 0, ea.IMAGES: 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "eval/loss"} <= set(tags["scalars"]), tags["scalars"]
    train = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in train] == list(range(1, STEPS + 1))
    _same(train, history[plots.TRAIN], 1e-6)
    evals = [(e.step, e.value) for e in events.Scalars("eval/loss")]
    assert [s for s, _ in evals] == [0, 2, 4]  # once before the first step, then every 2
    _same(evals, history[plots.EVAL], 1e-6)
    assert [e.step for e in events.Scalars("train/lr")] == list(range(1, STEPS + 1))
    assert events.Scalars("train/lr")[-1].value == 0.0  # cosine to 0 at the last step
    # The grid at each validation, the base model's once.
    assert [e.step for e in events.Images("validation")] == [2, 4]
    assert [e.step for e in events.Images("validation/base")] == [2]
    assert events.Images("validation")[0].width > 0

    # The recipe, flattened, as TensorBoard's hparams (accelerate writes them in a folder of their own).
    hparams = {}
    for folder in (p for p in (out / "logs").iterdir() if p.is_dir()):
        run = ea.EventAccumulator(str(folder))
        run.Reload()
        try:
            stored = run.PluginTagToContent("hparams")
        except KeyError:  # the folder of accelerate's hparams.yml
            continue
        for content in stored.values():
            info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
            hparams.update({key: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind")) for key, value in info.hparams.items()})
    assert hparams["schedule.steps"] == STEPS
    assert hparams["ema.enabled"] == 1  # torch's hparams writer stores a bool as a number
    assert hparams["data.eval_fraction"] == 0.5
    assert hparams["diffusion.timesteps.sampling"] == "uniform"


# --------------------------------------------------------------------------- wandb


def _records(path: Path):
    """The records of a wandb transaction log (``run-ID.wandb``), in order.

    wandb 0.31 ships no Python reader of its own (its internal DataStore went with the
    move to wandb-core); the file is LevelDB's log format — 32 KiB blocks of chunks,
    each a 7-byte header (crc32c, length, type: full / first / middle / last) — after a
    7-byte ``:W&B`` header, and each record is wandb's own ``Record`` protobuf.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a wandb transaction log"
    block, pos, record = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        record = chunk if kind in (1, 2) else record + chunk
        if kind in (1, 4):
            yield wandb_internal_pb2.Record.FromString(record)


def _wandb_run(out: Path) -> tuple[dict[int, dict[str, object]], dict[str, object]]:
    """(step -> logged values, config) of the one offline run in ``out``."""
    logs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1, logs
    steps: dict[int, dict[str, object]] = {}
    config: dict[str, object] = {}
    for record in _records(logs[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            steps.setdefault(record.history.step.num, {}).update(row)
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    return steps, config


def test_wandb_offline_run_holds_the_losses_at_their_steps(reported):
    out, _ = reported
    history = _history(out)
    steps, config = _wandb_run(out)
    train = [(step, row["train/loss"]) for step, row in sorted(steps.items()) if "train/loss" in row]
    evals = [(step, row["eval/loss"]) for step, row in sorted(steps.items()) if "eval/loss" in row]
    _same(train, history[plots.TRAIN], 1e-9)
    _same(evals, history[plots.EVAL], 1e-9)
    assert [s for s, _ in evals] == [0, 2, 4]
    assert all("train/lr" in steps[s] for s in range(1, STEPS + 1))
    clip = [(step, row["validation/clip_score"]) for step, row in sorted(steps.items()) if "validation/clip_score" in row]
    _same(clip, history[plots.CLIP], 1e-9)
    # The grids as images of the run (the base model's at the first validation).
    assert steps[2]["validation/_type"] == "images/separated" and steps[4]["validation/_type"] == "images/separated"
    assert steps[2]["validation/base/_type"] == "images/separated"
    assert len(list((out / "wandb").glob("offline-run-*/files/media/images/**/*.png"))) == 3
    # The recipe as the run's config.
    value = lambda key: config[key]["value"] if isinstance(config[key], dict) else config[key]
    assert value("schedule.steps") == STEPS and value("ema.decay") == 0.5


def test_train_prints_no_wandb_banner_only_where_its_run_is(reported):
    out, console = reported
    lines = console.splitlines()
    mentions = [line for line in lines if "wandb" in line.lower() or "w&b" in line.lower()]
    run_folder = next((out / "wandb").glob("offline-run-*"))
    assert mentions == [
        f"INFO pixart_tune.training.tracking: wandb: offline run in {run_folder} (upload it with 'wandb sync {run_folder}')",
        f"  wandb/  Weights & Biases run files (an offline run: wandb sync {out / 'wandb'}/offline-run-*)",
    ], console
    assert "Traceback" not in console and len(lines) < 25, console


# --------------------------------------------------------------------------- wandb missing


def test_wandb_missing_is_one_line_naming_the_extra(tiny_model, red_dataset, tmp_path, monkeypatch, capsys):  # noqa: F811
    from pixart_tune.cli import main as cli
    from pixart_tune.training.trainer import run

    # None in sys.modules makes ``import wandb`` fail (and importlib's find_spec answer None) as if it were not installed.
    monkeypatch.setitem(sys.modules, "wandb", None)
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"report_to lists wandb, which is not installed: pip install 'pixart-tune\[wandb\]'"):
        run(tiny_config(tiny_model, red_dataset, out, "logging.report_to=[wandb]", "schedule.steps=2"), progress=False)
    assert not out.exists(), "a refused recipe left files"

    args = ["train", str(TINY_RECIPE), f"model={tiny_model}", f"data.path={red_dataset}", f"output_dir={out}", "logging.report_to=[wandb]",
            "validation.prompts=[]", "--no-progress"]
    assert cli(args) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("pixart-tune train: error: logging.report_to lists wandb"), captured.err
    assert "pixart-tune[wandb]" in captured.err
    assert not out.exists()


# --------------------------------------------------------------------------- loss.json, loss.png, the summary


def _history_of(eval_points: list[tuple[int, float]], path: Path) -> plots.LossHistory:
    history = plots.LossHistory(path / LOSS_HISTORY)
    for step in range(1, 9):
        history.add(plots.TRAIN, step, 2.0 / step)
    for step, value in eval_points:
        history.add(plots.EVAL, step, value)
    return history


def test_lowest_eval_is_the_lowest_point_and_how_far_the_last_rose(tmp_path):
    assert plots.lowest_eval(_history_of([(2, 1.0), (4, 0.8), (6, 0.9), (8, 1.0)], tmp_path)) == pytest.approx((4, 0.8, 0.25))
    # A tie goes to the earliest step: the adapter that got there first.
    assert plots.lowest_eval(_history_of([(2, 1.0), (4, 0.8), (6, 0.8), (8, 0.88)], tmp_path)) == pytest.approx((4, 0.8, 0.1))
    # Still falling at the end: the last is the lowest, no rise.
    assert plots.lowest_eval(_history_of([(2, 1.0), (4, 0.9), (6, 0.7)], tmp_path)) == pytest.approx((6, 0.7, 0.0))
    # One evaluation (only at the end) says nothing about a trend; none says nothing at all.
    assert plots.lowest_eval(_history_of([(8, 0.5)], tmp_path)) is None
    assert plots.lowest_eval(_history_of([], tmp_path)) is None


def _marker(figure) -> tuple[list[float], str] | None:
    """(x data, label) of the vertical line at the lowest held-out loss, if drawn."""
    lines = [line for line in figure.axes[0].get_lines() if line.get_label().startswith("lowest held-out loss")]
    assert len(lines) <= 1
    return (list(lines[0].get_xdata()), lines[0].get_label()) if lines else None


def test_the_plot_marks_the_lowest_eval_and_says_over_fitting_only_past_two_percent(tmp_path):
    rose = plots.loss_figure(_history_of([(2, 1.0), (4, 0.8), (6, 0.9), (8, 1.0)], tmp_path))
    labels = [line.get_label() for line in rose.axes[0].get_lines()]
    assert labels[:2] == ["training loss (mean over each logging window)", "held-out loss (fixed timesteps and noise)"]
    assert _marker(rose) == ([4, 4], "lowest held-out loss: step 4 (+25% by the end: over-fitting after it)")
    flat = plots.loss_figure(_history_of([(2, 1.0), (4, 0.8), (8, 0.808)], tmp_path))  # 1% above: noise
    assert _marker(flat) == ([4, 4], "lowest held-out loss: step 4")
    assert _marker(plots.loss_figure(_history_of([(8, 0.8)], tmp_path))) is None
    assert len(plots.loss_figure(_history_of([], tmp_path)).axes) == 1


def _finished(tmp_path: Path, eval_points: list[tuple[int, float]]) -> Path:
    """A finished run's folder with a loss history (and an empty adapter folder)."""
    out = tmp_path / "run"
    (out / "adapter").mkdir(parents=True)
    _history_of(eval_points, out).save()
    return out


@pytest.mark.parametrize(("last", "clause"), [(0.8, False), (0.808, False), (0.824, True), (1.0, True)])
def test_the_summary_says_where_the_held_out_loss_was_lowest(tmp_path, last, clause):
    out = _finished(tmp_path, [(2, 1.0), (4, 0.8), (6, 0.9), (8, last)])
    lines = [line for line in describe_outputs(out, out / "adapter") if "held-out" in line]
    assert len(lines) == 1 and lines[0].startswith("  held-out loss lowest at step 4 (0.8000)")
    assert ("over-fitting after it" in lines[0]) == clause, lines[0]
    if clause:
        assert f"{(last - 0.8) / 0.8:.0%} higher at the end" in lines[0] and "a checkpoint near step 4" in lines[0]


def test_a_single_evaluation_gives_no_lowest_line(tmp_path):
    out = _finished(tmp_path, [(8, 0.8)])
    assert not any("held-out" in line for line in describe_outputs(out, out / "adapter"))


def test_the_run_keeps_its_eval_series_and_plots_it(reported):
    out, console = reported
    history = _history(out)
    assert set(history) == {plots.TRAIN, plots.EVAL, plots.CLIP}
    assert [s for s, _ in history[plots.TRAIN]] == list(range(1, STEPS + 1))
    assert [s for s, _ in history[plots.EVAL]] == [0, 2, 4] and [s for s, _ in history[plots.CLIP]] == [2, 4]
    step, value, rise = plots.lowest_eval(plots.LossHistory.load(out, STEPS))
    assert (step, value) == min(history[plots.EVAL], key=lambda p: (p[1], p[0]))
    figure = plots.loss_figure(plots.LossHistory.load(out, STEPS))
    assert _marker(figure)[0] == [step, step]
    assert len(figure.axes) == 2  # the CLIP score in its own panel
    from PIL import Image

    with Image.open(out / LOSS_PLOT) as png:
        assert png.format == "PNG" and png.height > 500  # the two-panel figure: 7 x 5.5 in at 100 dpi
    summary = f"  held-out loss lowest at step {step} ({value:.4f})"
    assert any(line.startswith(summary) for line in console.splitlines()), console
    assert ("over-fitting after it" in console) == (rise > plots.OVERFIT_RISE)


# --------------------------------------------------------------------------- the model card


def _card(adapter: Path, out: Path) -> str:
    from pixart_tune.adapters.export import publish

    return (publish(adapter, out) / "README.md").read_text(encoding="utf-8")


def _table(card: str, heading: str) -> dict[str, str]:
    section = card.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ") and not line.startswith("| measure")]
    return {key.strip(): value.strip().strip("`") for key, value in rows if key.strip() != "setting"}


def test_the_card_shows_the_evaluation_and_the_ema_settings(reported, tmp_path):
    out, _ = reported
    history = _history(out)
    card = _card(out / "adapter", tmp_path / "published")
    evaluation = _table(card, "Evaluation")
    lowest_step, lowest = min(history[plots.EVAL], key=lambda p: (p[1], p[0]))
    assert evaluation["held-out loss at the end (fixed timesteps and noise; lower is better)"] == f"{history[plots.EVAL][-1][1]:.4f}"
    assert evaluation["lowest held-out loss"] == f"{lowest:.4f}"
    assert evaluation["at step"] == str(lowest_step)
    assert evaluation["CLIP score of the validation images (0-100, higher follows the prompts better)"] == f"{history[plots.CLIP][-1][1]:.2f}"
    settings = _table(card, "Training settings")
    assert settings["diffusion.timesteps.sampling"] == "uniform"
    assert {key: settings[key] for key in settings if key.startswith("ema.")} == {
        "ema.enabled": "True", "ema.decay": "0.5", "ema.start_step": "0", "ema.every": "1"}
    assert settings["optim.betas"] == "[0.9, 0.999]"
    assert not any("/" in value for value in settings.values()), "a local path reached the card"


def test_the_card_of_a_run_without_ema_or_evaluation(tiny_model, red_dataset, tmp_path):  # noqa: F811
    from pixart_tune.training.trainer import run

    adapter = run(tiny_config(tiny_model, red_dataset, tmp_path / "run", "schedule.steps=2", "checkpoint.every=0",
                              "diffusion.timesteps.sampling=range", "diffusion.timesteps.range=[0,399]"), progress=False)
    card = _card(adapter, tmp_path / "published")
    settings = _table(card, "Training settings")
    assert settings["diffusion.timesteps.sampling"] == "range"
    assert settings["diffusion.timesteps.range"] == "[0, 399]"
    assert not [key for key in settings if key.startswith("ema")]
    assert "## Evaluation" not in card


def test_the_summary_offers_wandb_sync_only_for_an_offline_run(tmp_path):
    out = _finished(tmp_path, [])
    (out / "wandb" / "run-20260101_000000-abc").mkdir(parents=True)
    assert [line for line in describe_outputs(out, out / "adapter") if line.startswith("  wandb/")] == ["  wandb/  Weights & Biases run files"]
    (out / "wandb" / "offline-run-20260101_000000-def").mkdir()
    assert "wandb sync" in describe_outputs(out, out / "adapter")[-1]
