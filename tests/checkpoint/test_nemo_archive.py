"""The .nemo archive: streamed members, tar-slip refusal, atomic output, extracted directories."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
import torch

from neva_tools.checkpoint.fill import RangeWriter
from neva_tools.checkpoint.nemo_archive import NemoArchive, weights_member
from neva_tools.checkpoint.nemo_writer import NemoWriter
from neva_tools.errors import NevaError

WEIGHTS = "model_weights.ckpt"


def _tar_with(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:") as tar:
        config = tarfile.TarInfo("model_config.yaml")
        config.size = 4
        tar.addfile(config, io.BytesIO(b"a: 1"))
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def test_written_archive_reads_back_with_tarfile_and_long_names(tmp_path: Path) -> None:
    long_name = "artifacts/" + "x" * 150 + "_tokenizer.model"
    out = tmp_path / "m.nemo"
    with NemoWriter(out) as writer:
        writer.add_yaml("model_config.yaml", {"tensor_model_parallel_size": 2})
        writer.add_bytes(long_name, b"sp")
        for rank in range(2):
            writer.add_torch(weights_member(rank, 2), {"w": torch.full((3,), float(rank))})
    with tarfile.open(out) as tar:
        names = tar.getnames()
        assert long_name in names and "mp_rank_01/model_weights.ckpt" in names
        assert tar.extractfile(long_name).read() == b"sp"
    with NemoArchive(out) as archive:
        assert archive.layout == "legacy" and archive.legacy_ranks() == (2, 1)
        assert torch.equal(archive.load_legacy(1)["w"], torch.ones(3))
        assert torch.equal(archive.lazy_legacy(0)["w"], torch.zeros(3))
        assert archive.other_members() == [long_name]


def test_skeleton_filled_by_offset_loads_with_torch(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(5, 3), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(4).to(torch.bfloat16)}
    out = tmp_path / "m.nemo"
    with NemoWriter(out) as writer:
        writer.add_yaml("model_config.yaml", {"a": 1})
        offsets = writer.add_torch_skeleton(WEIGHTS, {k: (t.shape, t.dtype) for k, t in tensors.items()})
        writer.add_bytes("after.txt", b"next member")
        with RangeWriter(writer.fileno()) as fill:
            for key, tensor in tensors.items():
                fill.write(tensor, offsets[key])
    with NemoArchive(out) as archive:
        loaded = archive.load_legacy()
        lazy = archive.lazy_legacy()
        assert list(loaded) == list(tensors) and list(lazy) == list(tensors)
        for key, tensor in tensors.items():
            assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor)
            assert torch.equal(lazy[key], tensor)
            path, offset = lazy.locate(key)
            with open(path, "rb") as fh:
                fh.seek(offset)
                assert fh.read(tensor.numel() * tensor.element_size()) == tensor.view(torch.uint8).numpy().tobytes()
        with archive.open("after.txt") as fh:
            assert fh.read() == b"next member"
    with tarfile.open(out) as tar:  # torch.load(mmap=True) needs the member as a file of its own
        tar.extractall(tmp_path / "x", filter="data")
    mapped = torch.load(tmp_path / "x" / WEIGHTS, mmap=True, weights_only=True)
    assert all(torch.equal(mapped[k], t) for k, t in tensors.items())


def test_skeleton_offsets_past_4_gib_use_zip64(tmp_path: Path) -> None:
    """A 7B TP=1 shard is ~13 GB: offsets after a >4 GiB record come from zip64 headers (a sparse file here)."""
    big = (5 << 30) + 3
    specs = {"small": ((4,), torch.float32), "big": ((big,), torch.uint8), "after": ((3, 2), torch.bfloat16)}
    out = tmp_path / "z.nemo"
    with NemoWriter(out) as writer:
        writer.add_yaml("model_config.yaml", {"a": 1})
        offsets = writer.add_torch_skeleton(WEIGHTS, specs)
        with RangeWriter(writer.fileno()) as fill:
            fill.write(torch.arange(4.0), offsets["small"])
            fill.write(torch.arange(16, dtype=torch.uint8), offsets["big"] + big - 16)
            fill.write(torch.full((3, 2), 7.0, dtype=torch.bfloat16), offsets["after"])
    assert out.stat().st_size > big and out.stat().st_blocks * 512 < 16 << 20
    with NemoArchive(out) as archive:
        lazy = archive.lazy_legacy()
        assert torch.equal(lazy["small"], torch.arange(4.0))
        assert torch.equal(lazy.rows("big", big - 16, big), torch.arange(16, dtype=torch.uint8))
        assert torch.equal(lazy["after"], torch.full((3, 2), 7.0, dtype=torch.bfloat16))


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_skeleton_touches_no_tensor_memory_even_when_deterministic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deterministic = torch.utils.deterministic
    before = (torch.are_deterministic_algorithms_enabled(), deterministic.fill_uninitialized_memory)
    rss_while_saving = []
    save = torch.save
    monkeypatch.setattr(torch, "save", lambda *a, **k: (rss_while_saving.append(_rss()), save(*a, **k)))
    torch.use_deterministic_algorithms(True)  # torch.empty would then fill (touch) every byte
    try:
        start = _rss()
        with NemoWriter(tmp_path / "m.nemo") as writer:
            offsets = writer.add_torch_skeleton(WEIGHTS, {"big": ((1 << 26,), torch.uint8)})  # 64 MiB
            assert deterministic.fill_uninitialized_memory  # restored
            assert offsets["big"] > 0
    finally:
        torch.use_deterministic_algorithms(before[0])
        deterministic.fill_uninitialized_memory = before[1]
    assert rss_while_saving[0] - start < 32 << 20  # the stand-in tensor exists but was never touched
    assert (tmp_path / "m.nemo").stat().st_blocks * 512 < 8 << 20  # the unfilled bytes are a hole


def test_extracted_directory_reads_like_the_archive(tmp_path: Path) -> None:
    out = tmp_path / "m.nemo"
    with NemoWriter(out) as writer:
        writer.add_yaml("model_config.yaml", {"a": 1})
        writer.add_torch("model_weights.ckpt", {"w": torch.arange(4.0)})
    folder = tmp_path / "extracted"
    with tarfile.open(out) as tar:
        tar.extractall(folder, filter="data")
    with NemoArchive(folder) as archive:
        assert archive.read_config() == {"a": 1}
        assert torch.equal(archive.lazy_legacy()["w"], torch.arange(4.0))


@pytest.mark.parametrize("name", ["../escape.txt", "/etc/evil", "a/../../evil"])
def test_members_escaping_the_target_are_refused(tmp_path: Path, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.size = 1
    path = _tar_with(tmp_path / "evil.nemo", [(info, b"x")])
    with pytest.raises(NevaError, match="would escape the extraction directory"):
        NemoArchive(path)


def test_links_are_refused(tmp_path: Path) -> None:
    link = tarfile.TarInfo("tokenizer.model")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    path = _tar_with(tmp_path / "link.nemo", [(link, None)])
    with pytest.raises(NevaError, match="is a link"):
        NemoArchive(path)


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "m.nemo"
    with pytest.raises(RuntimeError), NemoWriter(out) as writer:
        writer.add_yaml("model_config.yaml", {"a": 1})
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_not_an_archive_and_no_config(tmp_path: Path) -> None:
    junk = tmp_path / "junk.nemo"
    junk.write_bytes(b"\x00\x01 not a tar" * 100)
    with pytest.raises(NevaError, match=r"junk\.nemo"):
        NemoArchive(junk)
    empty = tmp_path / "empty.nemo"
    with tarfile.open(empty, "w:"):
        pass
    with pytest.raises(NevaError, match=r"has no model_config\.yaml"):
        NemoArchive(empty)
