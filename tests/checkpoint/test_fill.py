"""``RangeWriter``: file-to-file range copies (and their read/write fallback), tensors and zeros by offset."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest
import torch

from neva_tools.checkpoint.fill import RangeWriter
from neva_tools.errors import NevaError


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "src.bin"
    path.write_bytes(os.urandom(3 << 20))
    return path


@pytest.mark.parametrize("range_copy", [True, False], ids=["copy_file_range", "pread-pwrite"])
def test_copies_tensors_and_zeros_land_at_their_offsets(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, range_copy: bool
) -> None:
    if not range_copy:

        def refuse(*args: object) -> int:
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    monkeypatch.setattr("neva_tools.checkpoint.fill._BUFFER", 1 << 20)  # several buffer rounds per copy
    data = source.read_bytes()
    tensor = torch.randn(5, 7).to(torch.bfloat16).T  # non-contiguous: written in C order
    out = tmp_path / "out.bin"
    fd = os.open(out, os.O_RDWR | os.O_CREAT)
    try:
        with RangeWriter(fd) as writer:
            writer.copy(str(source), 1000, 2_500_000, 10)
            writer.write(tensor, 3_000_000)
            writer.zeros(100, 2_600_000)
            assert writer.written == 2_500_000 + tensor.numel() * 2 + 100
            assert writer.range_copy is range_copy
    finally:
        os.close(fd)
    assert not [t for t in threading.enumerate() if t.name == "neva-writeback"]  # the writeback thread ended
    got = out.read_bytes()
    assert got[10 : 10 + 2_500_000] == data[1000 : 1000 + 2_500_000]
    assert got[2_600_000:2_600_100] == bytes(100)
    assert got[3_000_000:] == tensor.contiguous().view(torch.uint8).numpy().tobytes()


def test_copy_past_the_end_of_the_source_names_the_file(source: Path, tmp_path: Path) -> None:
    fd = os.open(tmp_path / "out.bin", os.O_RDWR | os.O_CREAT)
    try:
        with RangeWriter(fd) as writer, pytest.raises(NevaError, match=r"src\.bin ends before byte"):
            writer.copy(str(source), (3 << 20) - 10, 20, 0)
    finally:
        os.close(fd)
