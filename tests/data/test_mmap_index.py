"""An mmap dataset is checked against its index before it is counted or trained on
(``neva_tools.data.mmap_index.check_index``): a ``.bin`` cut short or longer than the index says, an ``.idx`` cut short,
sequences that do not follow each other, document boundaries that do not cover the sequences, and an empty dataset
are each an error naming the file and both sizes, exit status 2 — where ``neva data count-tokens`` used to report
the index's counts with exit status 0."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from neva_tools.cli.main import main
from neva_tools.data.mmap import count_tokens, preprocess_jsonl
from neva_tools.errors import NevaError

HEADER = 34  # magic (9) + version (8) + dtype code (1) + sequence count (8) + document count (8)


@pytest.fixture(autouse=True)
def _plain_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory, sp_model: Path, corpus: list[str]) -> Path:
    """A 12-document mmap dataset (uint16 tokens, one sequence per document, EOD appended)."""
    root = tmp_path_factory.mktemp("mmap")
    src = root / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus[:12]))
    return preprocess_jsonl(src, root / "corpus", sp_model, append_eod=True).prefix


def _copy(dataset: Path, tmp_path: Path) -> Path:
    prefix = tmp_path / dataset.name
    for ext in (".bin", ".idx"):
        shutil.copy(f"{dataset}{ext}", f"{prefix}{ext}")
    return prefix


def _count(capsys: pytest.CaptureFixture[str], prefix: Path) -> tuple[int, str, str]:
    code = main(["data", "count-tokens", str(prefix)])
    out, err = capsys.readouterr()
    return code, out, err


def test_valid_dataset_counts(dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    count = count_tokens(dataset)
    assert (count.documents, count.sequences) == (12, 12) and count.tokens * 2 == Path(f"{dataset}.bin").stat().st_size
    code, out, err = _count(capsys, dataset)
    assert code == 0 and f"12 documents, 12 sequences, {count.tokens:,} tokens" in out and err == ""


def _idx_arrays(prefix: Path) -> tuple[bytearray, int, int]:
    raw = bytearray(Path(f"{prefix}.idx").read_bytes())
    count = int(np.frombuffer(raw, np.uint64, 1, 18)[0])
    documents = int(np.frombuffer(raw, np.uint64, 1, 26)[0])
    return raw, count, documents


@pytest.mark.parametrize("size", [3, 0, "half", "plus-one"])
def test_bin_not_as_long_as_the_index_says(size: Any, dataset: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    prefix = _copy(dataset, tmp_path)
    bin_path = Path(f"{prefix}.bin")
    full = bin_path.stat().st_size
    data = bin_path.read_bytes()
    cut = {"half": full // 2, "plus-one": full + 1}.get(size, size)
    bin_path.write_bytes(data[:cut] if cut <= full else data + b"\x00")
    code, out, err = _count(capsys, prefix)
    tokens = full // 2
    state = "is truncated" if cut < full else "holds bytes beyond them"
    assert code == 2 and out == "" and "Traceback" not in err
    assert err == (f"neva: error: {bin_path} holds {cut:,} bytes but its index {prefix}.idx describes {tokens:,} "
                   f"tokens of uint16 ({full:,} bytes): the .bin {state} or belongs to another index; run neva data "
                   "preprocess again to rebuild the pair\n")  # fmt: skip


def test_idx_cut_short(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = _copy(dataset, tmp_path)
    idx = Path(f"{prefix}.idx")
    raw = idx.read_bytes()
    for cut in (len(raw) - 3, HEADER + 5, 20):
        idx.write_bytes(raw[:cut])
        code, _, err = _count(capsys, prefix)
        assert code == 2 and f"{idx}" in err and "Traceback" not in err and err.count("\n") == 1, err
    idx.write_bytes(raw + b"\x00" * 5)  # longer than its counts say
    code, _, err = _count(capsys, prefix)
    assert code == 2 and f"{idx} holds {len(raw) + 5:,} bytes but its header describes 12 sequences and 12 documents " \
        f"({len(raw):,} bytes): it is truncated or corrupt" in err, err  # fmt: skip


def test_sequences_that_do_not_follow_each_other(dataset: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    prefix = _copy(dataset, tmp_path)
    raw, count, _ = _idx_arrays(prefix)
    pointers = np.frombuffer(raw, np.int64, count, HEADER + 4 * count)
    pointers[5] += 2  # sequence 5 starts one token late
    Path(f"{prefix}.idx").write_bytes(raw)
    code, _, err = _count(capsys, prefix)
    assert code == 2 and f"{prefix}.idx: sequence 4 (at byte " in err and "sequence 5 starts at" in err, err
    assert "the sequences do not follow each other, the index is corrupt" in err


def test_document_boundaries_must_cover_the_sequences(dataset: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    prefix = _copy(dataset, tmp_path)
    raw, count, documents = _idx_arrays(prefix)
    bounds = np.frombuffer(raw, np.int64, documents, HEADER + 12 * count)
    bounds[-1] = count - 2  # the last two sequences in no document
    Path(f"{prefix}.idx").write_bytes(raw)
    code, _, err = _count(capsys, prefix)
    assert code == 2 and "its document boundaries do not cover its 12 sequences in order (first 0, last 10)" in err


def test_empty_dataset_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = tmp_path / "empty_text_document"
    IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16).finalize(f"{prefix}.idx")
    code, _, err = _count(capsys, prefix)
    assert code == 2 and f"{prefix}.idx describes an empty dataset (no document)" in err, err


def test_training_config_refuses_a_cut_bin(dataset: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """Text pretraining reads the blend's datasets through the same check (``parse_blend``): ``neva config validate``
    lists the problem, ``neva train`` stops on it (exit status 2) before building anything."""
    prefix = _copy(dataset, tmp_path)
    Path(f"{prefix}.bin").write_bytes(Path(f"{prefix}.bin").read_bytes()[:3])
    overrides = ["model.text_pretrain.enabled=true", f"model.text_pretrain.data_path={prefix}",
                 f"model.mm_cfg.llm.from_pretrained={tmp_path / 'llm.nemo'}",
                 f"exp_manager.exp_dir={tmp_path}"]  # fmt: skip
    expected = f"model.text_pretrain.data_path: {prefix}.bin holds 3 bytes but its index {prefix}.idx describes"
    assert main(["config", "validate", *overrides]) == 1
    out = capsys.readouterr().out
    assert f"problem: {expected}" in out, out
    assert main(["train", *overrides]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err, err


def test_check_reads_in_bounded_chunks(dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sequences are checked a chunk at a time; the tokens are the same, and the step across two chunks is checked."""
    import neva_tools.data.mmap_index as mmap_index

    whole = count_tokens(dataset).tokens
    monkeypatch.setattr(mmap_index, "_CHECK_CHUNK", 4)
    assert count_tokens(dataset).tokens == whole
    prefix = _copy(dataset, tmp_path)
    raw, count, _ = _idx_arrays(prefix)
    np.frombuffer(raw, np.int64, count, HEADER + 4 * count)[4] += 2  # the first sequence of the second chunk
    Path(f"{prefix}.idx").write_bytes(raw)
    with pytest.raises(NevaError, match=r"sequence 3 \(at byte"):
        count_tokens(prefix)
