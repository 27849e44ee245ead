"""Atomic outputs: renamed into place with normal permissions; nothing left behind on failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from neva_tools.errors import NevaError
from neva_tools.utils.atomic import HF_MODEL_DIR, atomic_path


def test_file_gets_umask_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "out.bin") as tmp:
            tmp.write_bytes(b"x")
        with atomic_path(tmp_path / "outdir", kind=HF_MODEL_DIR) as tmp:
            (tmp / "f").write_text("y")
    finally:
        os.umask(old)
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "outdir").stat().st_mode & 0o777 == 0o755


def test_replace_directory_and_refuse_without_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "d"
    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_text("old")
    with pytest.raises(NevaError, match="--overwrite"), atomic_path(target, kind=HF_MODEL_DIR, overwrite=False):
        pass
    with atomic_path(target, kind=HF_MODEL_DIR) as tmp:
        (tmp / "config.json").write_text("{}")
    assert sorted(os.listdir(target)) == ["config.json"]
    assert sorted(os.listdir(tmp_path)) == ["d"]


def test_exception_removes_temporary(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "x.bin") as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError
    assert os.listdir(tmp_path) == []
