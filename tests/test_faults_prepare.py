"""Fault injection for ``pixart-tune prepare``: bad inputs as a careless or unlucky user makes them.

Each row of ``CASES`` builds one fault on disk beside a good image, runs the real
command line (``pixart-tune prepare`` through ``pixart_tune.cli.main``, in a thread
so that a hang fails the row instead of the suite), and states the outcome: the
exit code, one line naming the file or value and the fix, no traceback, and the
source left exactly as it was. Permission faults are made with ``chmod`` and also
injected at the system call (``os.open``, ``os.scandir``, ``os.mkdir``), so that
they bite when the tests run as root too.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import stat
import subprocess
from pathlib import Path
from typing import Callable

import pytest
import torch
from PIL import Image

from pixart_tune import cli
from pixart_tune.data import sources
from pixart_tune.data.cache import FeatureCache
from pixart_tune.errors import UserError
from tests.fault_table import answer, answered
from tests.prepare_fixtures import encode, photo, write


@dataclasses.dataclass
class Case:
    name: str
    build: Callable[["Ctx"], None]
    """Makes the fault under ctx.src / ctx.out (the source already holds good.png)."""
    code: int
    says: str
    """A regular expression that one line of the output matches."""
    check: Callable[["Ctx"], None] | None = None
    """Further checks after the run (the report, the cache)."""
    source_changes: bool = False
    """The fault is the source changing during the run: it cannot stay as it was."""


@dataclasses.dataclass
class Ctx:
    tmp: Path
    src: Path
    out: Path
    model: str
    monkeypatch: pytest.MonkeyPatch
    denied: set[str] = dataclasses.field(default_factory=set)
    cleanup: list[Callable[[], None]] = dataclasses.field(default_factory=list)

    def deny(self, path: Path) -> None:
        """Makes ``path`` unreadable (or, for a folder, unlistable and unwritable), even for root."""
        self.denied.add(str(path))
        mode = path.lstat().st_mode
        path.chmod(0)
        self.cleanup.append(lambda: path.chmod(stat.S_IMODE(mode)))

    def report(self) -> dict:
        return json.loads((self.out / "report.json").read_text(encoding="utf-8"))

    def prepare(self) -> int:
        return cli.main(["prepare", str(self.src), "--out", str(self.out), "--model", self.model, "--resolution", "256", "--no-progress", "--workers", "1"])


def _install_denials(ctx: Ctx) -> None:
    def denied(path) -> bool:
        return isinstance(path, (str, os.PathLike)) and os.fspath(path) in ctx.denied

    def fail(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))

    real_open, real_scandir, real_mkdir = os.open, os.scandir, os.mkdir

    def fake_open(path, *args, **kwargs):
        return fail(path) if denied(path) else real_open(path, *args, **kwargs)

    def fake_scandir(path="."):
        return fail(path) if denied(path) else real_scandir(path)

    def fake_mkdir(path, *args, **kwargs):
        return fail(path) if denied(Path(path).parent) else real_mkdir(path, *args, **kwargs)

    ctx.monkeypatch.setattr(os, "open", fake_open)
    ctx.monkeypatch.setattr(os, "scandir", fake_scandir)
    ctx.monkeypatch.setattr(os, "mkdir", fake_mkdir)


def digest(root: Path) -> str:
    """Names, kinds, modes, times and bytes of everything under ``root`` (FIFOs and unreadable files are not opened)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            info = path.lstat()
            h.update(f"{os.fsencode(path.relative_to(root))!r}|{info.st_mode}|{info.st_mtime_ns}".encode())
            if stat.S_ISLNK(info.st_mode):
                h.update(os.fsencode(os.readlink(path)))
            elif stat.S_ISREG(info.st_mode) and info.st_mode & 0o444:
                h.update(path.read_bytes())
    return h.hexdigest()


# the faults ---------------------------------------------------------------------------
def fifo(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)


def sidecar(ctx: Ctx, text: str = "a red fox") -> None:
    (ctx.src / "good.txt").write_text(text)


def vanish_after_scan(ctx: Ctx) -> None:
    for i in range(3):
        write(ctx.src / "gone" / f"{i}.png", encode(photo(256, 256, seed=i + 1), "PNG"))
    real = sources.read_metadata

    def read_then_delete(root, unread=None):  # runs after the scan, before the first image is read
        for path in sorted((ctx.src / "gone").iterdir()):
            path.rename(ctx.tmp / path.name)
        return real(root, unread)

    ctx.monkeypatch.setattr(sources, "read_metadata", read_then_delete)


def live_lock(ctx: Ctx) -> None:
    sleeper = subprocess.Popen(["sleep", "300"])
    ctx.cleanup.append(lambda: (sleeper.kill(), sleeper.wait()))
    write(ctx.out / ".prepare.lock", f"{sleeper.pid}\n".encode())


def dead_lock(ctx: Ctx) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    write(ctx.out / ".prepare.lock", f"{gone.pid}\n".encode())


def prepared_then(damage: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
    """A first, clean run into --out, then ``damage`` to what it wrote."""
    def build(ctx: Ctx) -> None:
        sidecar(ctx)
        assert ctx.prepare() == 0
        damage(ctx)
    return build


def cut_latent(ctx: Ctx) -> None:
    latent = next((ctx.out / "latents").iterdir())
    latent.write_bytes(latent.read_bytes()[:40])


def disk_full(ctx: Ctx) -> None:
    from pixart_tune.data import cache

    def no_space(tensors, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    ctx.monkeypatch.setattr(cache, "save_file", no_space)


def read_only_parent(ctx: Ctx) -> None:
    parent = ctx.tmp / "locked_parent"
    parent.mkdir()
    ctx.out = parent / "out"
    ctx.deny(parent)


def latin1_name(ctx: Ctx) -> None:
    write(ctx.src / os.fsdecode(b"caf\xe9_terrace.png"), encode(photo(256, 256, seed=7), "PNG"))


def check_latin1_name(ctx: Ctx) -> None:
    report = ctx.report()
    named = {a["source"]: a for a in report["accepted"]}
    assert named["caf\\xe9_terrace.png"]["caption"] == "café terrace"
    FeatureCache(ctx.out).read_manifest()


def check_caption(expected: str) -> Callable[[Ctx], None]:
    def check(ctx: Ctx) -> None:
        assert {a["source"]: a["caption"] for a in ctx.report()["accepted"]}["good.png"] == expected
    return check


def second_image(ctx: Ctx, name: str = "x.png") -> None:
    """An image beside good.png for a mask fault to spoil, so that good.png still trains and the run answers 0."""
    write(ctx.src / name, encode(photo(256, 256, seed=3), "PNG"))


def check_mask(value: float) -> Callable[[Ctx], None]:
    def check(ctx: Ctx) -> None:
        cache = FeatureCache(ctx.out)
        [item] = cache.read_manifest().items
        assert torch.allclose(cache.read_mask(item.mask_key), torch.full((1, 32, 32), value))
    return check


def check_counts(**expected: int) -> Callable[[Ctx], None]:
    def check(ctx: Ctx) -> None:
        counts = ctx.report()["counts"]
        assert {k: counts[k] for k in expected} == expected
    return check


CASES = [
    # files that are not regular: never opened
    Case("fifo metadata.jsonl", lambda c: fifo(c.src / "metadata.jsonl"), 0, r"^  metadata.jsonl: metadata file not read \(a FIFO \(named pipe\), not a regular file\)", check_counts(unread=1, accepted=1)),
    Case("fifo caption file", lambda c: fifo(c.src / "good.txt"), 0, r"^  good.txt: caption file not read \(a FIFO", check_caption("good")),
    Case("fifo with an image name", lambda c: fifo(c.src / "pipe.jpg"), 0, r"^  pipe.jpg: a FIFO \(named pipe\), not a regular file"),
    Case("link to a fifo", lambda c: (fifo(c.src / "pipe"), os.symlink("pipe", c.src / "link.jpg")), 0, r"^  link.jpg: symlink to a FIFO \(named pipe\), not a regular file"),
    Case("folder named like an image", lambda c: write(c.src / "album.jpg" / "inner.png", encode(photo(256, 256, seed=5), "PNG")), 0, r"^prepared 2 of 2 images"),
    Case("fifo metadata.csv in a subfolder", lambda c: fifo(c.src / "sub" / "metadata.csv"), 0, r"^  sub/metadata.csv: metadata file not read \(a FIFO"),
    # symlink loops
    Case("file link to itself", lambda c: os.symlink("loop.jpg", c.src / "loop.jpg"), 0, r"^  loop.jpg: symlink loop"),
    Case("two links to each other", lambda c: (os.symlink("b.png", c.src / "a.png"), os.symlink("a.png", c.src / "b.png")), 0, r"^  a.png: symlink loop"),
    Case("folder link back to the source", lambda c: ((c.src / "sub").mkdir(), os.symlink(c.src, c.src / "sub" / "back")), 0, r"^  sub/back: symlinked folder loops back"),
    Case("broken link", lambda c: os.symlink("missing.png", c.src / "dangling.png"), 0, r"^  dangling.png: broken symlink"),
    # the source changing or unreadable
    Case("folder deleted after the scan", vanish_after_scan, 0, r"^  gone/0.png: vanished after the scan \(deleted or moved while prepare ran\)", check_counts(seen=4, accepted=1, skipped=3), source_changes=True),
    Case("unreadable subfolder", lambda c: (write(c.src / "private" / "x.png", encode(photo(256, 256, seed=3), "PNG")), c.deny(c.src / "private")), 0, r"^  private: cannot list this folder \(Permission denied\): the images in it were not read; fix its permissions"),
    Case("unreadable image", lambda c: (write(c.src / "x.png", encode(photo(256, 256, seed=3), "PNG")), c.deny(c.src / "x.png")), 0, r"^  x.png: cannot read the file \(Permission denied\); fix its permissions"),
    Case("unreadable caption file", lambda c: (sidecar(c), c.deny(c.src / "good.txt")), 0, r"^  good.txt: caption file not read \(Permission denied\); the next caption source is used", check_caption("good")),
    Case("unreadable metadata", lambda c: (write(c.src / "metadata.jsonl", b'{"file_name": "good.png", "text": "meta"}\n'), c.deny(c.src / "metadata.jsonl")), 0, r"^  metadata.jsonl: metadata file not read \(Permission denied\)", check_counts(unread=1)),
    # malformed text
    Case("UTF-16 caption with an odd byte count", lambda c: write(c.src / "good.txt", b"\xff\xfe" + "a red fox".encode("utf-16-le") + b"x"), 0, r"^captions from: sidecar 1", check_caption("a red fox")),
    Case("metadata not UTF-8", lambda c: write(c.src / "metadata.jsonl", '{"file_name": "good.png", "text": "café"}\n'.encode("cp1252")), 1, r"error: .*metadata.jsonl: not UTF-8 text \(byte \d+\); save it as UTF-8"),
    Case("metadata line not an object", lambda c: write(c.src / "metadata.jsonl", b"[1, 2]\n"), 1, r"error: .*metadata.jsonl: line 1 is not a JSON object"),
    Case("metadata line not JSON", lambda c: write(c.src / "metadata.jsonl", b'{"file_name": "good.png"}\n{oops\n'), 1, r"error: .*metadata.jsonl: line 2 is not valid JSON; fix or remove that line"),
    Case("metadata.csv without file_name", lambda c: write(c.src / "metadata.csv", b"image,text\ngood.png,a cat\n"), 1, r"error: .*metadata.csv: every row needs a 'file_name' column"),
    Case("file name not UTF-8", latin1_name, 0, r"^report: ", check_latin1_name),
    # --out
    Case("--out is a file", lambda c: write(c.out, b"mine"), 1, r"error: --out .* is a file; give a folder"),
    Case("--out under a file", lambda c: (write(c.tmp / "afile", b"mine"), setattr(c, "out", c.tmp / "afile" / "out")), 1, r"error: cannot write to --out .*afile/out \(Not a directory\)"),
    Case("read-only parent of --out", read_only_parent, 1, r"error: cannot write to --out .*locked_parent/out \(Permission denied\); choose a folder you can write to"),
    Case("--out/latents links into the source", lambda c: ((c.src / "sub").mkdir(), c.out.mkdir(), os.symlink(c.src / "sub", c.out / "latents")), 1, r"error: --out .*/latents is a link into the source .*; prepare never writes into the source"),
    Case("--out/latents is a file", lambda c: write(c.out / "latents", b"x"), 1, r"error: --out .*/latents is a file, where prepare writes a folder; move it away"),
    Case("--out/report.json is a folder", lambda c: (c.out / "report.json").mkdir(parents=True), 1, r"error: --out .*/report.json is a folder, where prepare writes a file"),
    Case("--out/text is a fifo", lambda c: fifo(c.out / "text"), 1, r"error: --out .*/text is a FIFO \(named pipe\), where prepare writes a folder"),
    Case("--out locked by a running prepare", live_lock, 1, r"error: --out .* is being prepared by process \d+ \(lock .*\.prepare\.lock\); wait for it to finish"),
    Case("stale lock of a dead process", dead_lock, 0, r"^prepared 1 of 1 images", lambda c: not (c.out / ".prepare.lock").exists() or pytest.fail("lock left")),
    Case("disk full while writing a latent", lambda c: disk_full(c), 1, r"error: cannot write .*latents.*\(No space left on device\); free some space and re-run prepare", lambda c: not (c.out / ".prepare.lock").exists() or pytest.fail("lock left")),
    # damaged outputs of an earlier run
    Case("latent cut short", prepared_then(cut_latent), 0, r"^  1 damaged cache entries were encoded again", check_counts(latents_encoded=1, cache_entries_repaired=1)),
    Case("garbage manifest", prepared_then(lambda c: (c.out / "dataset.json").write_bytes(b"\x00garbage")), 0, r"^prepared 1 of 1 images", lambda c: FeatureCache(c.out).read_manifest()),
    # loss masks (NAME.mask.png beside NAME.EXT): a bad mask skips its image alone, naming the mask and the fix
    Case("truncated mask", lambda c: (second_image(c), write(c.src / "x.mask.png", encode(Image.new("L", (256, 256), 255), "PNG")[:70])), 0,
         r"^  x.png: x.mask.png: truncated: .*; fix or re-save the mask, or remove it to train this image unmasked$", check_counts(accepted=1, skipped=1)),
    Case("mask of another size", lambda c: (second_image(c), write(c.src / "x.mask.png", encode(Image.new("L", (100, 80), 255), "PNG"))), 0,
         r"^  x.png: x.mask.png is 100x80 but x.png is 256x256: save the mask at the image's size$", check_counts(accepted=1, skipped=1)),
    Case("RGB mask", lambda c: write(c.src / "good.mask.png", encode(Image.new("RGB", (256, 256), (255, 0, 0)), "PNG")), 0,
         r"^masks: 1 of 1 images have masks", check_mask(76 / 255)),
    Case("orphan mask", lambda c: write(c.src / "lonely.mask.png", encode(Image.new("L", (256, 256), 255), "PNG")), 0,
         r"^  lonely.mask.png: a mask with no image beside it", check_counts(seen=1, accepted=1, skipped=0)),
    Case("folder named like a mask", lambda c: (second_image(c), write(c.src / "x.mask.png" / "notes.txt", b"mine")), 0,
         r"^  x.png: x.mask.png: a folder, not an image file; fix or re-save the mask, or remove it", check_counts(accepted=1, skipped=1)),
    Case("unreadable mask", lambda c: (second_image(c), write(c.src / "x.mask.png", encode(Image.new("L", (256, 256), 255), "PNG")), c.deny(c.src / "x.mask.png")), 0,
         r"^  x.png: x.mask.png: cannot read the file \(Permission denied\); fix its permissions"),
    Case("fifo mask", lambda c: (second_image(c), fifo(c.src / "x.mask.png")), 0, r"^  x.png: x.mask.png: a FIFO \(named pipe\), not a regular file"),
    Case("garbage scan index", prepared_then(lambda c: (c.out / "scan_index.json").write_text("{")), 0, r"^prepared 1 of 1 images"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fault(case: Case, tmp_path, tiny_model, monkeypatch, capsys):
    ctx = Ctx(tmp_path, tmp_path / "src", tmp_path / "out", tiny_model, monkeypatch)
    write(ctx.src / "good.png", encode(photo(256, 256), "PNG"))
    _install_denials(ctx)
    try:
        case.build(ctx)
        capsys.readouterr()
        before = digest(ctx.src)
        code = answer(ctx.prepare, "prepare")
        output = capsys.readouterr()
        errors = answered(output, code, case.code, case.says, "prepare")
        if case.code != 0:
            assert len(errors) == 1 and output.err.strip() == errors[0] and errors[0].startswith("pixart-tune prepare: error:"), output.err
        assert case.source_changes or digest(ctx.src) == before, "the source changed"
        if case.check is not None:
            case.check(ctx)
    finally:
        ctx.denied.clear()
        for undo in reversed(ctx.cleanup):
            undo()


def test_damaged_cache_files_name_the_file_and_the_fix(tmp_path, tiny_model):
    """What training reads: a damaged manifest or entry names its file and says to re-run prepare."""
    src, out = tmp_path / "src", tmp_path / "out"
    write(src / "good.png", encode(photo(256, 256), "PNG"))
    assert cli.main(["prepare", str(src), "--out", str(out), "--model", tiny_model, "--resolution", "256", "--no-progress"]) == 0
    cache = FeatureCache(out)
    key = cache.read_manifest().items[0].latent_key
    cache.latent_path(key).write_bytes(b"\x08" + b"\x00" * 7 + b"{garbage")
    with pytest.raises(UserError, match=rf"cache entry .*{key}.safetensors is damaged .*re-run 'pixart-tune prepare'"):
        cache.read_latent(key)
    manifest = out / "dataset.json"
    for bad in [b"{not json", b"[]", b'{"format": 2, "items": [{"source": 1}]}']:
        manifest.write_bytes(bad)
        with pytest.raises(UserError, match=r"dataset.json is damaged .*re-run 'pixart-tune prepare'"):
            cache.read_manifest()


def test_two_prepares_into_one_out_the_second_refuses(tmp_path, tiny_model, capsys):
    """A real second process: while the first holds --out, the second answers in one line and writes nothing."""
    import sys
    import time

    src, out = tmp_path / "src", tmp_path / "out"
    for i in range(12):
        write(src / f"{i}.png", encode(photo(256, 256, seed=i), "PNG"))
    command = [sys.executable, "-m", "pixart_tune.cli", "prepare", str(src), "--out", str(out), "--model", tiny_model, "--resolution", "256", "--no-progress", "--workers", "1"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (out / ".prepare.lock").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (out / ".prepare.lock").exists(), "the first prepare never took its lock"
        code = cli.main(command[3:])
        err = capsys.readouterr().err.strip()
        assert code == 1 and re.fullmatch(rf"pixart-tune prepare: error: --out {re.escape(str(out))} is being prepared by process {first.pid} \(lock .*", err), err
    finally:
        output, _ = first.communicate(timeout=300)
    assert first.returncode == 0, output
    assert "prepared 12 of 12 images" in output
    assert not (out / ".prepare.lock").exists()
    assert len(FeatureCache(out).read_manifest().items) == 12
