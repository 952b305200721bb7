"""Fault injection for the adapter verbs (``sample``, ``merge``, ``export``): bad inputs as a careless user gives them.

Each row of ``CASES`` makes one fault under a fresh folder (``in/`` holds a good
PEFT adapter ``a``, a second one ``b`` and a prompts file; ``out/`` is where the
verb writes), runs the real command line (``pixart_tune.cli.main``, in a thread so
that a hang fails the row instead of the suite) and states the outcome: the exit
code, one line naming the file or value and what to do, no traceback, ``in/`` left
byte for byte as it was, and, when the verb refuses, ``out/`` too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from pixart_tune import cli
from pixart_tune.adapters.export import export_adapter
from pixart_tune.base import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from tests.adapter_fixtures import adapters  # noqa: F401  (a fixture)
from tests.fault_table import answer, answered

STEPS = "2"


@dataclasses.dataclass
class Ctx:
    tmp: Path
    model: str
    inp: Path
    out: Path

    @property
    def a(self) -> Path:
        return self.inp / "a"

    @property
    def b(self) -> Path:
        return self.inp / "b"

    def sample(self, *extra: str) -> list[str]:
        return ["sample", "--model", self.model, "--prompt", "a cat", "--steps", STEPS, "--out", str(self.out), *extra]


@dataclasses.dataclass
class Case:
    name: str
    build: Callable[[Ctx], list[str]]
    """Makes the fault; returns the command line (verb first)."""
    code: int
    says: str
    """A regular expression that one line of the output matches."""
    check: Callable[[Ctx], None] | None = None
    """Further checks after the run (what was written, what stayed)."""


def digest(root: Path) -> str:
    """Names, kinds and bytes of everything under ``root``; FIFOs are named, never opened."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")) if root.exists() else []:
        h.update(str(path.relative_to(root)).encode())
        if path.is_fifo():
            h.update(b"fifo")
        elif path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


# --- faults ------------------------------------------------------------------------------


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def config_edit(**fields) -> Callable[[Ctx], None]:
    def edit(ctx: Ctx) -> None:
        config = json.loads((ctx.a / ADAPTER_CONFIG).read_text())
        config.update(fields)
        (ctx.a / ADAPTER_CONFIG).write_text(json.dumps(config))  # json writes NaN / Infinity as Python reads them

    return edit


def poison_weights(value: float, folder: str = "a") -> Callable[[Ctx], None]:
    """One value of the first lora_B weight (sorted by key) set to ``value``."""
    def edit(ctx: Ctx) -> None:
        file = ctx.inp / folder / ADAPTER_WEIGHTS
        state = load_file(str(file))
        key = sorted(k for k in state if "lora_B" in k)[0]
        state[key][0, 0] = value
        save_file(state, str(file), metadata={"format": "pt"})

    return edit


def flat_file(ctx: Ctx, alpha: float | None = None) -> Path:
    """``a`` exported as one ComfyUI file (alpha tensors); with ``alpha``, the first one set to it."""
    [file] = export_adapter(ctx.a, ["comfyui"], ctx.inp / "flat" / "a.safetensors")
    if alpha is not None:
        state = load_file(str(file))
        state[sorted(k for k in state if k.endswith(".alpha"))[0]] = torch.tensor(alpha)
        save_file(state, str(file), metadata={"format": "pt"})
    return file


def export_a(ctx: Ctx, *extra: str) -> list[str]:
    return ["export", str(ctx.a), "--format", "comfyui", "--out", str(ctx.out / "a.safetensors"), *extra]


def then(edit: Callable[[Ctx], None], argv: Callable[[Ctx], list[str]]) -> Callable[[Ctx], list[str]]:
    def build(ctx: Ctx) -> list[str]:
        edit(ctx)
        return argv(ctx)

    return build


def keeps(*names: str) -> Callable[[Ctx], None]:
    def check(ctx: Ctx) -> None:
        for name in names:
            assert (ctx.out / name).read_bytes() == b"mine", f"{name} changed"

    return check


def publish_over_a_clone(ctx: Ctx) -> list[str]:
    write(ctx.out / "notes.txt", b"mine")
    write(ctx.out / ".git" / "config", b"mine")
    write(ctx.out / "README.md", b"old card")
    Image.new("RGB", (16, 16), "red").save(write(ctx.inp / "shots" / "s.png", b""))
    return ["export", str(ctx.a), "--publish", str(ctx.out), "--samples", str(ctx.inp / "shots"), "--overwrite"]


def check_publish(ctx: Ctx) -> None:
    keeps("notes.txt", ".git/config")(ctx)
    assert (ctx.out / "README.md").read_bytes() != b"old card" and (ctx.out / ADAPTER_WEIGHTS).is_file()
    assert (ctx.out / "images" / "sample_0.png").is_file()
    assert not [p for p in ctx.tmp.iterdir() if p.name.endswith(".tmp")], "temporary folder left behind"


def sample_over_old_outputs(ctx: Ctx) -> list[str]:
    write(ctx.out / "grid.png", b"old")
    write(ctx.out / "notes.txt", b"mine")
    return ctx.sample("--overwrite")


def check_sample_replaced(ctx: Ctx) -> None:
    keeps("notes.txt")(ctx)
    assert (ctx.out / "grid.png").read_bytes()[:4] == b"\x89PNG" and (ctx.out / "00_000_seed0.png").is_file()


def merge_over_own_output(ctx: Ctx) -> list[str]:
    assert cli.main(["merge", str(ctx.a), str(ctx.b), "--out", str(ctx.out)]) == 0
    return ["merge", str(ctx.a), f"{ctx.b}:0.5", "--out", str(ctx.out), "--overwrite"]


def fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


CASES = [
    # never lose a file: the output policy shared by the verbs
    Case("export into its own input folder", lambda c: ["export", str(c.a), "--format", "comfyui", "--out", str(c.a / ADAPTER_WEIGHTS), "--overwrite"], 1,
         r"error: the output .*/in/a/adapter_model.safetensors lies inside the input adapter \(.*/in/a\); .*choose a --out outside it"),
    Case("export onto its own input file", lambda c: ["export", str(flat_file(c)), "--format", "comfyui", "--out", str(c.inp / "flat" / "a.safetensors"), "--overwrite"], 1,
         r"error: the output .*a.safetensors is the input adapter"),
    Case("export --out exists", lambda c: (write(c.out / "a.safetensors", b"mine"), export_a(c))[1], 1,
         r"error: .*/out/a.safetensors exists; choose another --out or pass --overwrite to replace it", keeps("a.safetensors")),
    Case("export --out is a folder", lambda c: ((c.out / "a.safetensors").mkdir(parents=True), export_a(c, "--overwrite"))[1], 1,
         r"error: --out .*a.safetensors is a folder, where a file is written; move it away"),
    Case("export --format all --out is a file", lambda c: (write(c.out / "all", b"mine"), ["export", str(c.a), "--format", "all", "--out", str(c.out / "all"), "--overwrite"])[1], 1,
         r"error: .*/out/all is a file, where a folder is written for --out", keeps("all")),
    Case("export --publish over a repository clone", publish_over_a_clone, 0, r"^wrote the publish folder", check_publish),
    Case("export --publish exists", lambda c: (write(c.out / "notes.txt", b"mine"), ["export", str(c.a), "--publish", str(c.out)])[1], 1,
         r"error: .*/out exists; choose another --publish or pass --overwrite", keeps("notes.txt")),
    Case("export --publish inside the adapter", lambda c: ["export", str(c.a), "--publish", str(c.a / "pub")], 1,
         r"error: the output .*/in/a/pub lies inside the input adapter"),
    Case("merge --out holds the user's files", lambda c: (write(c.out / "notes.txt", b"mine"), ["merge", str(c.a), str(c.b), "--out", str(c.out), "--overwrite"])[1], 1,
         r"error: --out .*/out holds notes.txt, which this command does not write; --overwrite replaces a folder of its own outputs only", keeps("notes.txt")),
    Case("merge --overwrite over its own output", merge_over_own_output, 0, r"^wrote .*/out \(cat, rank 8"),
    Case("merge --out inside an input", lambda c: ["merge", str(c.a), str(c.b), "--out", str(c.a / "merged"), "--overwrite"], 1,
         r"error: the output .*/in/a/merged lies inside one of the input adapters"),
    Case("merge --out is a file", lambda c: (write(c.out, b"mine"), ["merge", str(c.a), str(c.b), "--out", str(c.out), "--overwrite"])[1], 1,
         r"error: --out .*/out is a file, where a folder is written"),
    Case("sample over an old grid.png", lambda c: (write(c.out / "grid.png", b"mine"), c.sample())[1], 1,
         r"error: .*/out/grid.png exists; choose another --out or pass --overwrite", keeps("grid.png")),
    Case("sample over old numbered PNGs", lambda c: (write(c.out / "00_000_seed0.png", b"mine"), c.sample())[1], 1,
         r"error: .*/out/00_000_seed0.png exists; choose another --out or pass --overwrite", keeps("00_000_seed0.png")),
    Case("sample --overwrite replaces only its own PNGs", sample_over_old_outputs, 0, r"^wrote 1 images and the comparison grid", check_sample_replaced),
    Case("sample --out is a file", lambda c: (write(c.out, b"mine"), c.sample())[1], 1, r"error: --out .*/out is a file, where a folder is written"),
    Case("sample --out is an adapter folder", lambda c: ["sample", "--model", c.model, "--prompt", "x", "--adapter", str(c.a), "--out", str(c.a), "--overwrite"], 1,
         r"error: the output .*/in/a/00_000_seed0.png lies inside an input adapter"),
    # never silently wrong: numbers checked where they enter
    Case("sample: NaN in the adapter's weights", then(poison_weights(float("nan")), lambda c: c.sample("--adapter", str(c.a))), 1,
         r"error: .*/in/a: the module transformer_blocks\.0\.\S+ holds NaN values \(in up\); the file is damaged or its training diverged"),
    Case("merge: inf in the adapter's weights", then(poison_weights(float("inf"), "b"), lambda c: ["merge", str(c.a), str(c.b), "--out", str(c.out)]), 1,
         r"error: .*/in/b: the module \S+ holds infinite values \(in up\)"),
    Case("export: NaN alpha tensor", lambda c: ["export", str(flat_file(c, float("nan"))), "--format", "onetrainer", "--out", str(c.out / "x.safetensors")], 1,
         r"error: .*a.safetensors: the module \S+ has alpha nan, which makes its update NaN"),
    Case("export: zero alpha tensor", lambda c: ["export", str(flat_file(c, 0.0)), "--format", "onetrainer", "--out", str(c.out / "x.safetensors")], 1,
         r"error: .*a.safetensors: the module \S+ has alpha 0.0, which makes its update nothing"),
    Case("sample --adapter A:nan", lambda c: c.sample("--adapter", f"{c.a}:nan"), 1, r"error: adapter .*/in/a: the scale nan is not a finite number; write PATH:SCALE"),
    Case("merge A:inf", lambda c: ["merge", f"{c.a}:inf", str(c.b), "--out", str(c.out)], 1, r"error: adapter .*/in/a: the scale inf is not a finite number"),
    Case("merge weights that overflow float32", lambda c: ["merge", str(c.a), f"{c.b}:1e39", "--method", "cat", "--out", str(c.out)], 1,
         r"error: the merged adapter: the module \S+ holds infinite values .*overflows float32: give smaller weights"),
    Case("merge --resize 0", lambda c: ["merge", str(c.a), "--resize", "0", "--out", str(c.out)], 1, r"error: MergeConfig: resize must be at least 1, got 0"),
    Case("sample --guidance nan", lambda c: c.sample("--guidance", "nan"), 1, r"error: .*guidance.*(nan.*finite|finite.*nan)"),
    Case("sample --steps 0", lambda c: ["sample", "--model", c.model, "--prompt", "x", "--steps", "0", "--out", str(c.out)], 1, r"error: steps must be 1 to 1000, got 0"),
    Case("sample --steps 1000000", lambda c: ["sample", "--model", c.model, "--prompt", "x", "--steps", "1000000", "--out", str(c.out)], 1, r"error: steps must be 1 to 1000"),
    Case("sample --sweep 0,nan", lambda c: c.sample("--adapter", str(c.a), "--sweep", "0,nan"), 1, r"error: .*sweep.*\bnan\b|error: .*sweep.* must be finite numbers"),
    Case("sample --seeds -1", lambda c: c.sample("--seeds", "-1"), 1, r"error: SampleConfig: seeds must be whole numbers from 0 to 2\*\*64 - 1"),
    Case("sample --aspect nan", lambda c: c.sample("--aspect", "nan"), 1, r"error: .*aspect.*(positive|finite) number"),
    # never blow up: sizes bounded before anything is allocated
    Case("sample --size 100000x100000", lambda c: c.sample("--size", "100000x100000"), 1, r"error: .*size 100000x100000 has 10000000000 pixels, beyond any PixArt-Sigma model"),
    Case("sample --size beyond the model's buckets", lambda c: c.sample("--size", "1024x1024"), 1,
         r"error: size 1024x1024 is beyond what this 256 px model draws \(at most 4x the pixels of its largest bucket"),
    Case("sample --size 0x256", lambda c: c.sample("--size", "0x256"), 1, r"error: .*--size '0x256': height and width must be positive"),
    # parsers: a damaged adapter_config.json names the file and the fix
    Case("adapter_config.json not JSON", then(lambda c: write(c.a / ADAPTER_CONFIG, "{r: 4,"), export_a), 1,
         r"error: .*/in/a/adapter_config.json is not readable JSON \(.*\); fix it, or write it again"),
    Case("adapter_config.json a JSON list", then(lambda c: write(c.a / ADAPTER_CONFIG, "[4, 8]"), export_a), 1,
         r"error: .*/in/a/adapter_config.json is not a JSON object of adapter settings but a JSON list"),
    Case("adapter_config.json not UTF-8", then(lambda c: write(c.a / ADAPTER_CONFIG, b'{"r": 4, "x": "\xe9"}'), export_a), 1,
         r"error: .*/in/a/adapter_config.json is not readable JSON"),
    Case("r: 0", then(config_edit(r=0), export_a), 1, r"error: .*/in/a/adapter_config.json: r is 0; set it to the rank the weights were trained with"),
    Case("r: four", then(config_edit(r="four"), export_a), 1, r"error: .*adapter_config.json: r is 'four'; set it to the rank"),
    Case("rank_pattern a list", then(config_edit(rank_pattern=["to_q"]), export_a), 1, r"error: .*adapter_config.json: rank_pattern must be an object of module-name regex -> number, not list"),
    Case("rank_pattern bad regex", then(config_edit(rank_pattern={"attn1.(to_q": 4}), export_a), 1,
         r"error: .*adapter_config.json: rank_pattern key 'attn1.\(to_q' is not a valid regular expression"),
    Case("rank_pattern zero", then(config_edit(rank_pattern={"to_q": 0}), export_a), 1, r"error: .*adapter_config.json: rank_pattern gives 'to_q' the value 0"),
    Case("lora_alpha not a number", then(config_edit(lora_alpha="sixteen"), export_a), 1, r"error: .*adapter_config.json: lora_alpha is 'sixteen'; set it to the training alpha"),
    Case("lora_alpha zero", then(config_edit(lora_alpha=0), export_a), 1, r"error: .*adapter_config.json: lora_alpha is 0; set it to the training alpha"),
    Case("lora_alpha NaN", then(config_edit(lora_alpha=float("nan")), export_a), 1, r"error: .*adapter_config.json: lora_alpha is nan"),
    Case("use_rslora a string", then(config_edit(use_rslora="yes"), export_a), 1, r"error: .*adapter_config.json: use_rslora is 'yes'; write true or false"),
    Case("adapter weights cut short", then(lambda c: write(c.a / ADAPTER_WEIGHTS, (c.a / ADAPTER_WEIGHTS).read_bytes()[:100]), export_a), 1,
         r"error: .*/in/a/adapter_model.safetensors is not a readable safetensors file"),
    # never hang: only regular files are opened
    Case("adapter file is a FIFO", lambda c: ["export", str(fifo(c.inp / "pipe.safetensors")), "--format", "comfyui", "--out", str(c.out / "x.safetensors")], 1,
         r"error: .*/in/pipe.safetensors is a FIFO \(named pipe\); pass an adapter folder or a regular .safetensors file"),
    Case("prompts file is a FIFO", lambda c: c.sample("--prompts-file", str(fifo(c.inp / "prompts.txt"))), 1, r"error: prompts file .*prompts.txt is not a regular file"),
    Case("prompts file not UTF-8", lambda c: c.sample("--prompts-file", str(write(c.inp / "prompts.txt", "café\n".encode("cp1252")))), 1,
         r"error: prompts file .*prompts.txt cannot be read as UTF-8 text .*; save it as UTF-8"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fault(case: Case, tmp_path, tiny_model, adapters, capsys):  # noqa: F811
    ctx = Ctx(tmp_path, tiny_model, tmp_path / "in", tmp_path / "out")
    shutil.copytree(adapters["a"], ctx.a)
    shutil.copytree(adapters["b"], ctx.b)
    argv = case.build(ctx)
    capsys.readouterr()
    before_in, before_out = digest(ctx.inp), digest(ctx.out)
    code = answer(lambda: cli.main(argv), argv[0])
    output = capsys.readouterr()
    errors = answered(output, code, case.code, case.says, argv[0])
    if case.code != 0:
        assert len(errors) == 1, output.err
        assert digest(ctx.out) == before_out, "a refused command changed its output"
    assert digest(ctx.inp) == before_in, "an input changed"
    if case.check is not None:
        case.check(ctx)


def test_fuzzed_adapter_configs_are_refused_in_one_line_or_give_a_finite_scale():
    """Random adapter_config.json values: each is a UserError naming the file, or a finite, positive alpha for every module."""
    import math
    import random

    from pixart_tune.adapters.checks import lora_config
    from pixart_tune.adapters.lora import peft_alpha
    from pixart_tune.errors import UserError

    rng = random.Random(11)
    values = [0, 1, 4, -2, 2.5, 1e308, float("nan"), float("inf"), "8", "x", None, True, [], [4], {}, {"to_q": 2}, {"(": 1}, {"to_q": 0}, {"to_q": "a"}]
    for _ in range(2000):
        config = {key: rng.choice(values) for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora") if rng.random() < 0.6}
        try:
            lora_config(config, "cfg.json")
        except UserError as error:
            assert str(error).startswith("cfg.json: ") and "\n" not in str(error)
            continue
        for name in ("transformer_blocks.0.attn1.to_q", "proj_out"):
            alpha = peft_alpha(config, name, 4)
            assert math.isfinite(alpha) and alpha > 0, (config, alpha)
