"""Fault injection for ``train``, ``plan`` and ``init-tiny``: bad input as a careless or unlucky user gives it.

Each row of ``CASES`` sets up one fault (a recipe value, an output folder, a
damaged dataset or checkpoint, a full disk), runs the real command line through
``pixart_tune.cli.main`` and states the outcome: the exit code, one line naming the
file or value and the fix, no traceback, and every file the user had before the
run left as it was (``keep``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

from pixart_tune import cli
from pixart_tune.data.cache import FeatureCache
from pixart_tune.training import checkpoint as ckpt
from tests.training_fixtures import TINY_RECIPE, cli_env, red_dataset  # noqa: F401  (fixture)

XL2_HUB_ID = "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"
"""Planned from the built-in XL-2 architecture: nothing is downloaded."""


@dataclasses.dataclass
class Ctx:
    tmp: Path
    model: str
    data: Path
    out: Path
    monkeypatch: pytest.MonkeyPatch
    keep: list[Path] = dataclasses.field(default_factory=list)
    """Files and folders the user had: they must come out of the run unchanged."""

    def train(self, *overrides: str, resume: str | None = None, data: Path | None = None) -> list[str]:
        base = [
            f"model={self.model}", f"data.path={data or self.data}", f"output_dir={self.out}", "logging.report_to=[]",
            "validation.prompts=[]", "schedule.steps=2", "checkpoint.every=1", "logging.every=1",
        ]
        return ["train", "--no-progress", *(["--resume", resume] if resume else []), str(TINY_RECIPE), *base, *overrides]

    def plan(self, *args: str) -> list[str]:
        return ["plan", str(TINY_RECIPE), f"model={self.model}", *args]

    def copy_data(self) -> Path:
        """A copy of the prepared dataset to damage."""
        target = self.tmp / "data"
        if not target.exists():
            shutil.copytree(self.data, target)
        return target

    def first_run(self, *overrides: str) -> None:
        """A clean run into output_dir with checkpoints at steps 1 and 2."""
        assert cli.main(self.train("schedule.steps=3", "checkpoint.keep_last=3", *overrides)) == 0


@dataclasses.dataclass
class Case:
    name: str
    argv: Callable[[Ctx], list[str]]
    """Sets up the fault and returns the command line."""
    code: int
    says: str
    """A regular expression one line of the output matches."""
    check: Callable[[Ctx], None] | None = None


def digest(path: Path) -> str:
    h = hashlib.sha256()
    for file in sorted([path] if path.is_file() else path.rglob("*")):
        h.update(str(file.relative_to(path.parent)).encode())
        if file.is_file():
            h.update(file.read_bytes())
    return h.hexdigest()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# the faults ---------------------------------------------------------------------------
def recipe_file(text: str) -> Callable[[Ctx], list[str]]:
    def argv(c: Ctx) -> list[str]:
        return ["train", "--no-progress", str(write(c.tmp / "recipe.yaml", text)), f"output_dir={c.out}"]
    return argv


def init_tiny_over(c: Ctx, mine: str, out: str) -> list[str]:
    """init-tiny into ``out`` where the user already has the file ``mine``."""
    c.keep.append(write(c.tmp / mine, "mine"))
    return ["init-tiny", str(c.tmp / out)]


def resume_after(damage: Callable[[Ctx], None], *overrides: str, resume: str = "latest") -> Callable[[Ctx], list[str]]:
    """A first run with checkpoints at steps 1 and 2, ``damage`` to it, then the run resumed to step 4."""
    def argv(c: Ctx) -> list[str]:
        c.first_run()
        damage(c)
        return c.train("schedule.steps=4", "checkpoint.keep_last=3", *overrides, resume=resume.format(out=c.out))
    return argv


def stale_tmp(c: Ctx) -> None:
    (c.out / "checkpoints" / ".step-000003.x1y2.tmp" / "adapter").mkdir(parents=True)
    (c.out / "checkpoints" / ".step-000001.deleting").mkdir()


def no_stale_left(c: Ctx) -> None:
    assert not [p.name for p in (c.out / "checkpoints").iterdir() if p.name.startswith(".")]


def damage_newest(c: Ctx) -> None:
    (c.out / "checkpoints" / "step-000002" / "optimizer.pt").write_bytes(b"PK\x03\x04 cut short")


def tamper_step(c: Ctx) -> None:
    write(c.out / "checkpoints" / "step-000002" / "state.json", json.dumps({"step": 7, "epoch": 0, "batch_in_epoch": 1}))


def edited_manifest(**changes) -> Callable[[Ctx], list[str]]:
    def argv(c: Ctx) -> list[str]:
        data = c.copy_data()
        manifest = json.loads((data / "dataset.json").read_text())
        manifest.update(changes)
        (data / "dataset.json").write_text(json.dumps(manifest))
        return c.train(data=data)
    return argv


def other_t5(c: Ctx) -> list[str]:
    """The model with its T5 changed (same width): the dataset's embeddings mean something else to it."""
    import torch
    from transformers import T5EncoderModel

    model = c.tmp / "other-t5"
    shutil.copytree(c.model, model)
    t5 = T5EncoderModel.from_pretrained(model / "text_encoder")
    with torch.no_grad():
        t5.shared.weight.mul_(1.5)
    t5.save_pretrained(model / "text_encoder")
    return c.train(f"model={model}")


def swapped_latent(c: Ctx) -> list[str]:
    """The square image's latent file replaced by the portrait's (same channels, other shape)."""
    data = c.copy_data()
    cache = FeatureCache(data)
    items = {tuple(i.bucket): i for i in cache.read_manifest().items}
    square, portrait = items[(256, 256)], next(i for b, i in items.items() if b != (256, 256))
    shutil.copyfile(cache.latent_path(portrait.latent_key), cache.latent_path(square.latent_key))
    return c.train(data=data)


def garbage_latent(c: Ctx) -> list[str]:
    data = c.copy_data()
    cache = FeatureCache(data)
    cache.latent_path(cache.read_manifest().items[0].latent_key).write_bytes(b"\x08" + b"\x00" * 7 + b"{garbage")
    return c.train(data=data)


def disk_full_as_torch_says(words: str) -> Callable[[Ctx], list[str]]:
    """torch.save fails on the second checkpoint with torch's own wording of a full disk."""
    def argv(c: Ctx) -> list[str]:
        real, calls = torch.save, []

        def save(obj, path, *args, **kwargs):
            calls.append(path)
            if len(calls) > 3:
                raise RuntimeError(f"[enforce fail at inline_container.cc:603] . {words}")
            return real(obj, path, *args, **kwargs)

        c.monkeypatch.setattr(ckpt.torch, "save", save)
        return c.train("schedule.steps=3")
    return argv


def check_intact_first(c: Ctx) -> None:
    assert [p.name for p in ckpt.list_checkpoints(c.out)] == ["step-000001"]
    assert ckpt.load_checkpoint(c.out / "checkpoints" / "step-000001").state.step == 1


CASES = [
    # recipe values: refused in one line naming the key, before anything is written
    Case("optim.lr=.nan", lambda c: c.train("optim.lr=.nan"), 1, r"error: optim.lr: nan is not a finite number"),
    Case("optim.lr=nan (string)", lambda c: c.train("optim.lr=nan"), 1, r"error: optim.lr: nan is not a finite number"),
    Case("optim.eps=-1", lambda c: c.train("optim.eps=-1"), 1, r"error: optim.eps must be positive"),
    Case("seed=-1", lambda c: c.train("seed=-1"), 1, r"error: .*seed must be in \[0, 2\*\*32\), got -1"),
    Case("seed=2**32", lambda c: c.train(f"seed={2**32}"), 1, r"error: .*seed must be in \[0, 2\*\*32\), got 4294967296"),
    Case("lora.alpha=.inf", lambda c: c.train("lora.alpha=.inf"), 1, r"error: lora.alpha: inf is not a finite number"),
    Case("validation.steps=0", lambda c: c.train("validation.steps=0"), 1, r"error: validation.steps must be at least 1, got 0"),
    Case("validation.seeds=[-1]", lambda c: c.train("validation.seeds=[-1]"), 1, r"error: validation.seeds must be in \[0, 2\*\*32\)"),
    Case("validation.height=100000", lambda c: c.train("validation.height=100000"), 1, r"error: validation.height and validation.width must be multiples of 16 from 64 to 4096, got 100000"),
    Case("lora.targets matching nothing", lambda c: c.train("lora.targets=nothing_here"), 1, r"error: lora.targets 'nothing_here' matches no layer of .*; use a preset"),
    Case("lora.targets not a regex", lambda c: c.train("lora.targets=(["), 1, r"error: .*lora.targets '\(\[' is not a valid regular expression"),
    Case("recipe is a YAML list", recipe_file("- model: tiny\n- seed: 1\n"), 1, r"error: .*recipe.yaml: holds a YAML list, not a mapping of keys"),
    Case("recipe is a YAML scalar", recipe_file("42\n"), 1, r"error: .*recipe.yaml: holds a YAML int \(42\), not a mapping"),
    Case("recipe not YAML", recipe_file("model: [unclosed\n"), 1, r"error: .*recipe.yaml: not valid YAML"),
    Case("recipe not UTF-8", lambda c: (c.tmp / "r.yaml").write_bytes(b"seed: \xff\n") and ["train", str(c.tmp / "r.yaml")], 1, r"error: .*r.yaml: not UTF-8 text"),
    # plan
    Case("plan --budget-gb -5", lambda c: c.plan("--budget-gb", "-5"), 1, r"error: --budget-gb -5: give the GPU memory in GiB, a positive number"),
    Case("plan --budget-gb nan", lambda c: c.plan("--budget-gb", "nan"), 1, r"error: --budget-gb nan: give the GPU memory"),
    Case("plan memory_budget_gb=.nan", lambda c: c.plan("memory_budget_gb=.nan"), 1, r"error: memory_budget_gb: nan is not a finite number"),
    Case("plan on a folder that is not a model", lambda c: ["plan", str(TINY_RECIPE), f"model={c.data}"], 1, r"error: model .* is not a PixArt-Sigma model folder \(no transformer/config.json\)"),
    Case("plan on a missing folder", lambda c: ["plan", str(TINY_RECIPE), f"model={c.tmp / 'nowhere'}"], 1, r"error: model .*nowhere does not exist"),
    # output_dir: a new run never writes over what is there
    Case("train into a folder holding the user's config.yaml", lambda c: c.keep.append(write(c.out / "config.yaml", "mine: 1\n")) or c.train(), 1, r"error: output_dir .*out is not empty \(config.yaml\); a new run needs an empty or new folder"),
    Case("output_dir is a file", lambda c: c.keep.append(write(c.out, "mine")) or c.train(), 1, r"error: output_dir .*out is a file; choose a folder"),
    Case("resume of its own run, stale .step-*.tmp cleaned", resume_after(stale_tmp), 0, r"removed 2 unfinished checkpoint folder\(s\) left by an interrupted run", no_stale_left),
    # checkpoints
    Case("damaged newest checkpoint", resume_after(damage_newest), 0, r"checkpoint .*step-000002 is damaged .*; resuming from the newest intact one before it"),
    Case("state.json step tampered", resume_after(tamper_step, resume="{out}/checkpoints/step-000002"), 1, r"error: checkpoint .*step-000002 is damaged \(state.json says step 7, the folder is step 2\)"),
    Case("resume with another lora.rank", resume_after(lambda c: None, "lora.rank=8"), 1, r"error: checkpoint .*step-000002 was trained with lora.rank=32 \(recipe: 8\); resume with the checkpoint's lora settings"),
    Case("disk full: torch's 'unexpected pos'", disk_full_as_torch_says("unexpected pos 64 vs 0"), 1, r"error: the disk is full: could not write checkpoint step-000002 .*step-000001, is intact.*--resume", check_intact_first),
    Case("disk full: torch's 'file write failed'", disk_full_as_torch_says("PytorchStreamWriter failed writing file data/0: file write failed"), 1, r"error: the disk is full", check_intact_first),
    # datasets
    Case("dataset from another VAE (scaling factor)", edited_manifest(vae_scaling_factor=0.18215), 1, r"error: dataset .*data does not fit this model \(its latents were scaled by 0.18215 \(another VAE\), this model's VAE scales by [\d.]+\)"),
    Case("dataset from another T5 of the same width", other_t5, 1, r"error: dataset .*does not fit this model \(its text embeddings were made by another T5 \(its weights differ from this model's text_encoder/\)\)"),
    Case("latent contradicting its bucket", swapped_latent, 1, r"error: cache entry .*\.safetensors \(flat_\d.png\) holds a latent of shape \[4, 40, 24\], but its bucket 256x256 needs \[4, 32, 32\].*re-run 'pixart-tune prepare'"),
    Case("damaged latent file", garbage_latent, 1, r"error: cache entry .*\.safetensors is damaged .*re-run 'pixart-tune prepare'"),
    Case("damaged manifest", lambda c: (c.copy_data() / "dataset.json").write_bytes(b"{not json") and c.train(data=c.copy_data()), 1, r"error: .*dataset.json is damaged .*re-run 'pixart-tune prepare'"),
    # EMA, held-out evaluation, class images, timesteps, optimizers, trackers, CLIP
    Case("ema.decay=1.5", lambda c: c.train("ema.enabled=true", "ema.decay=1.5"), 1, r"error: ema.decay must be in \(0, 1\), got 1.5"),
    Case("ema.every=0", lambda c: c.train("ema.every=0"), 1, r"error: ema.every must be at least 1, got 0"),
    Case("data.mask_floor=2", lambda c: c.train("data.mask_floor=2"), 1, r"error: data.mask_floor must be in \[0, 1\], got 2"),
    Case("data.eval_fraction=1", lambda c: c.train("data.eval_fraction=1"), 1, r"error: data.eval_fraction must be in \[0, 1\), got 1"),
    Case("data.eval_fraction holding out every image", lambda c: c.train("data.eval_fraction=0.9"), 1, r"error: data.eval_fraction=0.9 holds out 2 of the dataset's 2 image\(s\), leaving none to train on"),
    Case("data.eval_fraction and data.eval", lambda c: c.train("data.eval_fraction=0.5", f"data.eval={c.data}"), 1, r"error: data.eval_fraction and data.eval both name an evaluation set"),
    Case("data.eval a missing folder", lambda c: c.train(f"data.eval={c.tmp / 'nowhere'}"), 1, r"error: .*nowhere"),
    Case("evaluation.timesteps past the schedule", lambda c: c.train("data.eval_fraction=0.5", "evaluation.timesteps=[10,5000]"), 1, r"error: evaluation.timesteps .*5000"),
    Case("evaluation.timesteps=[]", lambda c: c.train("evaluation.timesteps=[]"), 1, r"error: evaluation.timesteps needs at least one timestep"),
    Case("two class datasets", lambda c: c.train(f"data.extra=[{{path: {c.copy_data()}, kind: class}}, {{path: {c.tmp / 'x'}, kind: class}}]"), 1, r"error: data.extra lists more than one dataset of kind: class"),
    Case("class ratio=0", lambda c: c.train(f"data.extra=[{{path: {c.copy_data()}, kind: class, ratio: 0}}]"), 1, r"error: .*ratio must be in \(0, 10\], got 0"),
    Case("class kind misspelt", lambda c: c.train(f"data.extra=[{{path: {c.copy_data()}, kind: classes}}]"), 1, r"error: .*kind.*classes"),
    Case("diffusion.weighting=snr", lambda c: c.train("diffusion.weighting=snr"), 1, r"error: diffusion.weighting 'snr' is not one of none, min_snr, soft_min_snr, debiased, p2"),
    Case("timestep range past the schedule", lambda c: c.train("diffusion.timesteps.sampling=range", "diffusion.timesteps.range=[0,5000]"), 1, r"error: diffusion.timesteps.range .*5000"),
    Case("timestep range without sampling=range", lambda c: c.train("diffusion.timesteps.range=[0,10]"), 1, r"error: diffusion.timesteps.range and range_bias apply to sampling=range only"),
    Case("prodigy not installed", lambda c: c.monkeypatch.setitem(sys.modules, "prodigyopt", None) or c.train("optim.name=prodigy", "optim.lr=1"), 1, r"error: optim.name=prodigy needs the prodigyopt package: pip install 'pixart-tune\[prodigy\]'"),
    Case("schedulefree not installed", lambda c: c.monkeypatch.setitem(sys.modules, "schedulefree", None) or c.train("optim.name=adamw_schedulefree"), 1, r"error: .*pip install 'pixart-tune\[schedulefree\]'"),
    Case("wandb not installed", lambda c: c.monkeypatch.setitem(sys.modules, "wandb", None) or c.train("logging.report_to=[wandb]"), 1, r"error: logging.report_to lists wandb, which is not installed: pip install 'pixart-tune\[wandb\]'"),
    Case("logging.report_to=[mlflow]", lambda c: c.train("logging.report_to=[mlflow]"), 1, r"error: logging.report_to 'mlflow' is not one of tensorboard, wandb"),
    Case("validation.clip_model a missing folder", lambda c: c.train("validation.prompts=[a red cat]", "validation.every=1", f"validation.clip_model={c.tmp / 'no_clip'}"), 1, r"error: .*validation.clip_model"),
    # init-tiny
    Case("init-tiny into a non-empty folder", lambda c: init_tiny_over(c, "models/notes.txt", "models"), 1, r"error: .*models exists and is not empty; choose a new folder"),
    Case("init-tiny onto a file", lambda c: init_tiny_over(c, "afile", "afile"), 1, r"error: .*afile is a file, not a folder"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fault(case: Case, tmp_path, tiny_model, red_dataset, monkeypatch, capsys, caplog):  # noqa: F811
    ctx = Ctx(tmp_path, tiny_model, red_dataset, tmp_path / "out", monkeypatch)
    argv = case.argv(ctx)
    capsys.readouterr()
    caplog.clear()
    before = {path: digest(path) for path in ctx.keep}
    code = cli.main(argv)
    output = capsys.readouterr()
    text = output.out + output.err + caplog.text
    assert "Traceback" not in text
    assert code == case.code, text
    assert re.search(case.says, text, re.MULTILINE), text
    if case.code != 0:
        verb = argv[0]
        errors = [line for line in output.err.splitlines() if line.startswith(f"pixart-tune {verb}: error:")]
        assert len(errors) == 1 and output.err.strip().endswith(errors[0]), output.err
    assert {path: digest(path) for path in ctx.keep} == before, "a file the user had changed"
    if case.check is not None:
        case.check(ctx)


def test_plan_of_a_huge_rank_never_allocates(tmp_path):
    """lora.rank=1000000 on XL-2 would be 4.6 GB per LoRA matrix: planned on the meta device under a 3 GiB data limit."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (3 * 2**30, 3 * 2**30))

    command = [sys.executable, "-m", "pixart_tune.cli", "plan", str(TINY_RECIPE), f"model={XL2_HUB_ID}", "lora.rank=1000000", "validation.prompts=[]"]
    result = subprocess.run(command, preexec_fn=limit, capture_output=True, text=True, env=cli_env(), timeout=300)
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr and "does NOT fit" in result.stdout


def test_short_of_space_the_oldest_checkpoint_goes_before_the_next_is_written(tiny_model, red_dataset, tmp_path, monkeypatch):  # noqa: F811
    """With less free space than one checkpoint, keep_last makes room first: never more than keep_last - 1 kept while writing."""
    out = tmp_path / "out"
    real_save, seen = torch.save, []

    def save(obj, path, *args, **kwargs):
        seen.append(len(ckpt.list_checkpoints(out)))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0))
    monkeypatch.setattr(ckpt.torch, "save", save)
    ctx = Ctx(tmp_path, tiny_model, red_dataset, out, monkeypatch)
    assert cli.main(ctx.train("schedule.steps=5", "checkpoint.keep_last=2")) == 0
    assert max(seen) == 1, seen
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-000003", "step-000004"]
