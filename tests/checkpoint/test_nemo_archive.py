"""The .nemo archive: streamed members, tar-slip refusal, atomic output, extracted directories."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
import torch

from neva_tools.checkpoint.nemo_archive import NemoArchive, NemoWriter, weights_member
from neva_tools.errors import NevaError


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
