"""Files as users expect: modes follow the umask, links to the user's files keep theirs."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pixart_tune.adapters.export import export_adapter
from pixart_tune.fsutil import atomic_path, current_umask
from tests.adapter_fixtures import adapters  # noqa: F401  (a fixture)


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_current_umask_reads_without_changing(umask):
    assert current_umask() == umask
    assert current_umask() == umask


def test_atomic_safetensors_file_and_folder_follow_the_umask(umask, tmp_path):
    # safetensors' own writer creates 0600 files whatever the umask: the reason for this test.
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    assert _mode(tmp_path / "plain.safetensors") == 0o600, "safetensors now honours the umask: the test shows nothing"

    with atomic_path(tmp_path / "one.safetensors") as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp))
    with atomic_path(tmp_path / "folder") as tmp:
        tmp.mkdir()
        save_file({"w": torch.zeros(2)}, str(tmp / "inner.safetensors"))
    expected = 0o666 & ~umask
    assert _mode(tmp_path / "one.safetensors") == expected
    assert _mode(tmp_path / "folder" / "inner.safetensors") == expected


def test_hard_links_to_the_users_files_keep_their_mode(tmp_path):
    mine = tmp_path / "base.safetensors"
    mine.write_bytes(b"x")
    os.chmod(mine, 0o600)
    with atomic_path(tmp_path / "fused") as tmp:
        tmp.mkdir()
        os.link(mine, tmp / "base.safetensors")  # as a fused model links the base model's files
    assert _mode(mine) == 0o600


def test_exported_and_adapter_files_are_readable_by_others(adapters, tmp_path):  # noqa: F811
    old = os.umask(0o022)
    try:
        [file] = export_adapter(adapters["a"], ["comfyui"], tmp_path / "a_comfy.safetensors")
    finally:
        os.umask(old)
    assert _mode(file) == 0o644
    for written in adapters["a"].iterdir():
        assert _mode(written) == 0o666 & ~current_umask(), written
