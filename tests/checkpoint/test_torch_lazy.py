"""``LazyStateDict``: round trips against ``torch.load``, tar members, one-tensor reads, unsafe and broken files."""

from __future__ import annotations

import collections
import io
import os
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from neva_tools.checkpoint import torch_lazy
from neva_tools.checkpoint.torch_lazy import LazyStateDict
from neva_tools.errors import NevaError


def _save(obj: Any, path: Path) -> Path:
    torch.save(obj, path)
    return path


def _tensors() -> dict[str, torch.Tensor]:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return {
        "fp32": torch.randn(3, 5),
        "bf16": torch.randn(7, 2).to(torch.bfloat16),
        "fp16": torch.randn(4).half(),
        "int64": torch.arange(-5, 5),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.empty(0, 4),
        "empty_int8": torch.empty(0, dtype=torch.int8),
        "base": base,
        "tail": base.view(-1)[2:],  # shares base's storage, offset 2
        "transposed": base.T,  # non-contiguous view of base's storage
        "column": base[1:, 3],  # strided, offset
        "every_other": base[::2, ::3],
        "expanded": torch.arange(3.0).expand(2, 3),  # stride 0
        "fp8": torch.randn(6).to(torch.float8_e4m3fn),  # _rebuild_tensor_v3 + UntypedStorage
        "uint16": torch.arange(5, dtype=torch.int32).to(torch.uint16),
    }


def _assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape and got.is_contiguous()
    assert torch.equal(got.reshape(-1).view(torch.uint8), want.contiguous().reshape(-1).view(torch.uint8))


def test_round_trip_matches_torch_load(tmp_path: Path) -> None:
    path = _save(_tensors(), tmp_path / "w.ckpt")
    want = torch.load(path, map_location="cpu", weights_only=True)
    with LazyStateDict(path) as lazy:
        assert list(lazy) == list(want) and len(lazy) == len(want)
        for key, tensor in want.items():
            assert lazy.shape(key) == tuple(tensor.shape) and lazy.dtype(key) == tensor.dtype
            assert lazy.nbytes(key) == tensor.numel() * tensor.element_size()
            _assert_same(lazy[key], tensor)
        base, tail = lazy["base"], lazy["tail"]
        base.zero_()  # every read is a fresh tensor, not shared with another key's
        assert tail[0] == 2.0


def test_values_ordered_dict_parameters_and_non_tensors(tmp_path: Path) -> None:
    sd = collections.OrderedDict(
        [
            ("z.weight", torch.nn.Parameter(torch.ones(2, 2))),
            ("a._extra_state", None),
            ("b._extra_state", io.BytesIO(b"te-state")),
            ("c._extra_state", torch.empty(0)),
            ("nested", {"x": torch.arange(3), "y": [torch.zeros(1), "s", 1.5]}),
        ]
    )
    path = _save(sd, tmp_path / "w.ckpt")
    lazy = LazyStateDict(str(path), name="my.nemo:model_weights.ckpt")
    assert list(lazy.keys()) == list(sd) and "nested" in lazy and "missing" not in lazy
    weight = lazy["z.weight"]
    assert type(weight) is torch.Tensor and not weight.requires_grad and torch.equal(weight, torch.ones(2, 2))
    assert lazy["a._extra_state"] is None and lazy["b._extra_state"] == b"te-state"
    assert lazy["c._extra_state"].shape == (0,) and lazy.is_tensor("c._extra_state")
    nested = lazy["nested"]
    assert torch.equal(nested["x"], torch.arange(3)) and nested["y"][1:] == ["s", 1.5]
    with pytest.raises(NevaError, match=r"my\.nemo:model_weights\.ckpt: 'a._extra_state' is a NoneType, not a tensor"):
        lazy.shape("a._extra_state")
    with pytest.raises(KeyError):
        lazy["missing"]
    lazy.close()


def test_members_of_uncompressed_tar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch_lazy, "_CHUNK", 5)  # many short readinto calls per tensor
    ckpt = _save(_tensors(), tmp_path / "model_weights.ckpt")
    other = _save({"x": torch.arange(7)}, tmp_path / "other.ckpt")
    config = tmp_path / "model_config.yaml"
    config.write_text("a: 1\n" * 100)
    tar_path = tmp_path / "model.nemo"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(config, arcname="./model_config.yaml")
        tar.add(ckpt, arcname="./tp_rank_00/model_weights.ckpt")
        tar.add(other, arcname="./tp_rank_01/model_weights.ckpt")
    want = torch.load(ckpt, map_location="cpu", weights_only=True)
    with tarfile.open(tar_path, "r:") as tar:
        fh, fh2 = tar.extractfile("./tp_rank_00/model_weights.ckpt"), tar.extractfile("./tp_rank_01/model_weights.ckpt")
        assert fh is not None and fh2 is not None
        lazy, lazy2 = LazyStateDict(fh, name="model.nemo:model_weights.ckpt"), LazyStateDict(fh2)
        for key in reversed(list(want)):  # any order, interleaved with another member of the same tar
            _assert_same(lazy[key], want[key])
            assert torch.equal(lazy2["x"], torch.arange(7))
        lazy.close()
        assert not fh.closed  # a caller's file object is left open


class _CountingFile(io.RawIOBase):
    """A seekable file that counts the bytes read through it."""

    def __init__(self, path: Path) -> None:
        self._f = open(path, "rb")  # noqa: SIM115 - closed by close()
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def readinto(self, buffer: Any) -> int:
        n = self._f.readinto(buffer)
        self.bytes_read += n
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


def test_reading_one_tensor_reads_only_its_bytes(tmp_path: Path) -> None:
    mb = 1 << 20
    path = _save({f"layer{i}.weight": torch.full((2 * mb,), float(i)) for i in range(20)}, tmp_path / "big.ckpt")
    counting = _CountingFile(path)
    lazy = LazyStateDict(counting)  # type: ignore[arg-type]
    assert len(lazy) == 20 and lazy.nbytes("layer7.weight") == 8 * mb
    assert counting.bytes_read < mb  # central directory and data.pkl only
    tensor = lazy["layer7.weight"]
    assert tensor.shape == (2 * mb,) and bool((tensor == 7.0).all())
    assert counting.bytes_read < 9 * mb
    counting.close()


class _Plain:
    pass


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return os.system, (f"touch {self.marker}",)


def test_unsafe_globals_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = _save({"w": torch.zeros(2), "evil": _RunsCode(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(NevaError, match=rf"evil\.ckpt: .*{os.system.__module__}\.system.* refused as unsafe"):
        LazyStateDict(path)
    assert not marker.exists()
    path = _save({"w": torch.zeros(2), "obj": _Plain()}, tmp_path / "plain.ckpt")
    with pytest.raises(NevaError, match=r"plain\.ckpt: .*\._Plain.* refused as unsafe"):
        LazyStateDict(path)


def test_not_a_torch_zip_file(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(NevaError, match=r"garbage\.ckpt is not a torch zip file or is truncated.*re-save it"):
        LazyStateDict(garbage)
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(NevaError, match=r"legacy\.ckpt is in torch's legacy pre-1\.6 format.*re-save it"):
        LazyStateDict(legacy)
    with pytest.raises(NevaError, match="cannot open"):
        LazyStateDict(tmp_path / "missing.ckpt")
    not_dict = _save([torch.zeros(1)], tmp_path / "list.ckpt")
    with pytest.raises(NevaError, match="holds a list, not a dict"):
        LazyStateDict(not_dict)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.99])
def test_truncated_file(tmp_path: Path, fraction: float) -> None:
    data = _save(_tensors(), tmp_path / "w.ckpt").read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(NevaError, match=r"cut\.ckpt"):
        LazyStateDict(cut)


def test_corrupt_local_header(tmp_path: Path) -> None:
    path = _save(_tensors(), tmp_path / "w.ckpt")
    with zipfile.ZipFile(path) as zf:
        offset = next(i.header_offset for i in zf.infolist() if i.filename.endswith("/data/0"))
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\0\0\0\0")
    lazy = LazyStateDict(path)
    with pytest.raises(NevaError, match=r"bad local zip header for data/0"):
        lazy["fp32"]


def _rewrite(src: Path, dst: Path, byteorder: bytes | None = None, compress: int = zipfile.ZIP_STORED) -> Path:
    """Copy a torch zip with Python's zipfile, optionally changing the byte order record or compressing."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=compress) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info.filename, byteorder if byteorder and info.filename.endswith("/byteorder") else data)
    return dst


def test_rewritten_zip_big_endian_and_compressed(tmp_path: Path) -> None:
    src = _save(_tensors(), tmp_path / "w.ckpt")
    want = torch.load(src, map_location="cpu", weights_only=True)
    lazy = LazyStateDict(_rewrite(src, tmp_path / "copy.ckpt"))  # local headers without torch's alignment padding
    for key in want:
        _assert_same(lazy[key], want[key])
    with pytest.raises(NevaError, match=r"big\.ckpt is 'big'-endian; load it with torch\.load and re-save"):
        LazyStateDict(_rewrite(src, tmp_path / "big.ckpt", byteorder=b"big"))
    with pytest.raises(NevaError, match=r"zip\.ckpt: storage record data/\d+ is compressed"):
        LazyStateDict(_rewrite(src, tmp_path / "zip.ckpt", compress=zipfile.ZIP_DEFLATED))


def test_rows_reads_only_the_requested_rows(tmp_path: Path) -> None:
    full = torch.arange(40.0).reshape(10, 4)
    path = tmp_path / "rows.ckpt"
    torch.save({"w": full, "t": full.T}, path)
    with LazyStateDict(path) as lazy:
        assert torch.equal(lazy.rows("w", 3, 7), full[3:7])
        assert torch.equal(lazy.rows("t", 1, 3), full.T[1:3])  # a strided (transposed) view
        assert lazy.rows("w", 5, 5).shape == (0, 4)
        with pytest.raises(ValueError, match="out of range"):
            lazy.rows("w", 8, 11)


def test_locate_names_the_bytes_of_contiguous_tensors_only(tmp_path: Path) -> None:
    path = _save(_tensors(), tmp_path / "w.ckpt")
    raw = path.read_bytes()
    with LazyStateDict(path) as lazy:
        for key in ("fp32", "bf16", "base", "tail", "scalar", "fp8"):  # "tail" starts 2 elements into base's record
            file, offset = lazy.locate(key)
            want = lazy[key].reshape(-1).view(torch.uint8).numpy().tobytes()
            assert file == str(path) and raw[offset : offset + len(want)] == want, key
        for key in ("transposed", "column", "every_other", "expanded"):
            assert lazy.locate(key) is None, key
    with open(path, "rb") as fh:
        assert LazyStateDict(fh).locate("fp32") is None  # a file object without an origin
