"""Archive members: reading is linear in their number; members the config does not reference are reported and left
out of the output; the rank directories cannot make the reader loop over ranks that do not exist."""

from __future__ import annotations

import tarfile
import time
from pathlib import Path

import pytest
import torch
import yaml
from builders import build_tiny_llm

from neva_tools.checkpoint.nemo_archive import NemoArchive, artifact_name, artifact_refs
from neva_tools.checkpoint.nemo_writer import NemoWriter
from neva_tools.cli.main import main
from neva_tools.convert.hf_to_nemo import convert_hf_to_nemo
from neva_tools.errors import NevaError

JUNK = 200_000


def append_junk(source: Path, dest: Path, count: int) -> Path:
    """``source`` with ``count`` empty members ``junk/NNNNNNN.bin`` added before its end-of-archive blocks.

    The headers are made from one template (name bytes and checksum patched), which takes a second where
    ``tarfile`` would take ten.
    """
    with tarfile.open(source) as tar:
        end = max(m.offset_data + -(-m.size // 512) * 512 for m in tar.getmembers())
    template = tarfile.TarInfo("junk/0000000.bin")
    template.mtime = 0
    header = bytearray(template.tobuf(format=tarfile.USTAR_FORMAT))
    header[148:156] = b" " * 8
    base = sum(header) - sum(header[:16])
    with open(source, "rb") as fin, open(dest, "wb") as fout:
        fout.write(fin.read(end))
        chunk = bytearray()
        for i in range(count):
            name = b"junk/%07d.bin" % i
            header[:16] = name
            header[148:156] = b"%06o\0 " % (base + sum(name))
            chunk += header
            if len(chunk) >= 1 << 22:
                fout.write(chunk)
                chunk.clear()
        fout.write(chunk + bytes(1024))
    return dest


@pytest.fixture(scope="module")
def nemo_with_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny .nemo whose config references a tokenizer artifact, plus an artifact nothing references."""
    tmp = tmp_path_factory.mktemp("members")
    plain = tmp / "plain.nemo"
    convert_hf_to_nemo(str(build_tiny_llm("llama", tmp / "hf")), plain)
    with NemoArchive(plain) as archive:
        cfg, state = archive.read_config(), archive.load_legacy()
    tok, stale = artifact_name("tokenizer.model"), artifact_name("old_tokenizer.model")
    cfg["tokenizer"] = {"library": "sentencepiece", "model": f"nemo:{tok}"}
    out = tmp / "tok.nemo"
    with NemoWriter(out) as writer:
        writer.add_bytes(tok, b"the tokenizer")
        writer.add_bytes(stale, b"an artifact of an older config")
        writer.add_yaml("model_config.yaml", cfg)
        writer.add_torch("model_weights.ckpt", state)
    return out


def test_junk_members_are_read_in_linear_time_and_not_copied(
    nemo_with_tokenizer: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's case: 200,000 junk members took 555 s (a list searched per member) and were all copied."""
    junk = append_junk(nemo_with_tokenizer, tmp_path / "junk.nemo", JUNK)
    with NemoArchive(junk) as archive:
        assert len(archive.names) == JUNK + 4
    out = tmp_path / "out.nemo"
    start = time.perf_counter()
    assert main(["--no-progress", "repartition", "--input", str(junk), "--output", str(out), "--tp", "2"]) == 0
    seconds = time.perf_counter() - start
    assert seconds < 60, seconds  # about 5 s on 2 shared cores; the quadratic reader took over 500
    err = capsys.readouterr().err
    assert f"not copying {JUNK + 1} member(s) that model_config.yaml does not reference" in err
    assert "junk/0000000.bin" in err
    with NemoArchive(out) as archive:
        tokenizer = archive.read_config()["tokenizer"]["model"].removeprefix("nemo:")
        assert archive.names == sorted(["model_config.yaml", tokenizer, "mp_rank_00/model_weights.ckpt",
                                        "mp_rank_01/model_weights.ckpt"])  # fmt: skip
        with archive.open(tokenizer) as fh:
            assert fh.read() == b"the tokenizer"


def test_opening_members_does_not_search_a_list(nemo_with_tokenizer: Path, tmp_path: Path) -> None:
    junk = append_junk(nemo_with_tokenizer, tmp_path / "junk.nemo", JUNK)
    with NemoArchive(junk) as archive:
        last = archive.names[-20_000:]  # the end of the sorted list: a list search scans all 200,000 each time
        start = time.perf_counter()
        for name in last:
            with archive.open(name):
                pass
            assert archive.layout == "legacy" and archive.legacy_ranks() == (1, 1)
        assert time.perf_counter() - start < 20  # about 0.5 s; a list search per call takes minutes


def test_referenced_artifacts_files_and_directories() -> None:
    cfg = {"tokenizer": {"model": "nemo:./abc_tokenizer.model", "vocab": None},
           "mm_cfg": {"vision": ["nemo:def_vision", 3]}, "other": "nemo-not-a-ref"}  # fmt: skip
    assert artifact_refs(cfg) == {"abc_tokenizer.model", "def_vision"}
    deep: dict = {}
    node = deep
    for _ in range(100_000):  # nesting far beyond the recursion limit
        node["x"] = {}
        node = node["x"]
    node["ref"] = "nemo:deep.model"
    assert artifact_refs(deep) == {"deep.model"}


def test_split_artifacts_keeps_directory_members(tmp_path: Path) -> None:
    path = tmp_path / "a.nemo"
    with NemoWriter(path) as writer:
        writer.add_yaml("model_config.yaml", {"tokenizer": {"model": "nemo:tok_dir"}})
        writer.add_torch("model_weights.ckpt", {"w": torch.ones(1)})
        for name in ("tok_dir/vocab.json", "tok_dir/sub/merges.txt", "tok_dir_other/x", "stray.bin"):
            writer.add_bytes(name, b"x")
    with NemoArchive(path) as archive:
        kept, left = archive.split_artifacts()
    assert kept == ["tok_dir/sub/merges.txt", "tok_dir/vocab.json"]
    assert left == ["stray.bin", "tok_dir_other/x"]


def test_rank_directories_far_apart_and_none_at_all(tmp_path: Path) -> None:
    """A member named for TP rank 99,999,999 is a gap at rank 0/1, found at once; no weights at all is our error."""
    path = tmp_path / "ranks.nemo"
    with NemoWriter(path) as writer:
        writer.add_yaml("model_config.yaml", {})
        for name in ("tp_rank_00_pp_rank_000", "tp_rank_99999999_pp_rank_999"):
            writer.add_torch(f"{name}/model_weights.ckpt", {})
    start = time.perf_counter()
    with NemoArchive(path) as archive, pytest.raises(NevaError, match="missing the weights of TP rank 0, PP rank 1"):
        archive.legacy_ranks()
    assert time.perf_counter() - start < 5
    empty = tmp_path / "empty.nemo"
    with NemoWriter(empty) as writer:
        writer.add_yaml("model_config.yaml", {})
    with NemoArchive(empty) as archive, pytest.raises(NevaError, match=r"holds no weights \(model_weights\.ckpt"):
        archive.lazy_legacy()


def test_referenced_artifacts_of_an_alias_bomb_are_found_at_once() -> None:
    """YAML aliases share one object: ten levels of nine references each are 9**10 paths but 11 lists."""
    text = "l0: &l0 ['nemo:bomb.model', 1, 2, 3, 4, 5, 6, 7, 8]\n" + "".join(
        f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 11)
    )
    start = time.perf_counter()
    assert artifact_refs(yaml.safe_load(text)) == {"bomb.model"}
    assert time.perf_counter() - start < 5
