"""JSONL → Megatron mmap (.bin/.idx): round trip through megatron-core's IndexedDataset, workers, errors, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from neva_tools.data.mmap import count_tokens, preprocess_jsonl
from neva_tools.errors import NevaError
from neva_tools.tokenizer.text import TextTokenizer


def write_jsonl(path: Path, texts: list[str], key: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for i, text in enumerate(texts):
            fh.write(json.dumps({"id": str(i), key: text, "src": "test"}) + "\n")
    return path


@pytest.fixture
def texts(corpus: list[str]) -> list[str]:
    return [*corpus[:60], "", "Ünïcödé ✓ text", "  spaces  "]


@pytest.mark.parametrize("append_eod", [False, True])
def test_round_trip_equals_tokenizer_ids(tmp_path: Path, sp_model: Path, texts: list[str], append_eod: bool) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    src = write_jsonl(tmp_path / "in.jsonl", texts)
    summary = preprocess_jsonl(src, tmp_path / "out" / "corpus", sp_model, append_eod=append_eod)
    tok = TextTokenizer(sp_model)
    expected = [tok.encode(t) + ([tok.eos_id] if append_eod else []) for t in texts]

    assert summary.prefix == tmp_path / "out" / "corpus_text_document"
    assert summary.bin_path.is_file() and summary.idx_path.is_file()
    assert summary.documents == len(texts)
    assert summary.tokens == sum(map(len, expected))
    assert summary.bytes_in == src.stat().st_size
    assert summary.dtype == "uint16"  # vocab 400 < 65500: Megatron's DType.optimal_dtype
    ds = IndexedDataset(str(summary.prefix))
    assert ds.index.dtype == np.uint16
    assert len(ds) == len(texts)
    assert ds.document_indices.tolist() == list(range(len(texts) + 1))
    assert [ds[i].tolist() for i in range(len(ds))] == expected
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "corpus_text_document.bin",
        "corpus_text_document.idx",
    ]


def test_workers_give_identical_bytes(tmp_path: Path, sp_model: Path, corpus: list[str]) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", corpus[:150])
    b = write_jsonl(tmp_path / "b.jsonl", corpus[150:260])
    one = preprocess_jsonl([a, b], tmp_path / "one", sp_model, append_eod=True, workers=1)
    two = preprocess_jsonl([a, b], tmp_path / "two", sp_model, append_eod=True, workers=2, chunk_size=7)
    assert one.documents == two.documents == 260
    assert one.bin_path.read_bytes() == two.bin_path.read_bytes()
    assert one.idx_path.read_bytes() == two.idx_path.read_bytes()


def test_custom_key_and_blank_lines(tmp_path: Path, sp_model: Path, corpus: list[str]) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", corpus[:5], key="content")
    src.write_text(src.read_text().replace("\n", "\n\n", 2))  # two blank lines: not records
    summary = preprocess_jsonl(src, tmp_path / "c", sp_model, json_key="content")
    assert summary.prefix.name == "c_content_document"
    assert (summary.documents, summary.blank_lines) == (5, 2)


BAD_LINES = [
    ('{"text": "ok"', "not valid JSON", '\'{"text": "ok"\''),
    ('{"body": "no text key"}', "no 'text' key", "'body'"),
    ('{"text": 42}', "'text' is a int (42), not a string", "42"),
    ('["text", "a list"]', "expected a JSON object, found a list", "a list"),
]


@pytest.mark.parametrize(
    ("line", "problem", "found", "workers"),
    [(*case, 1) for case in BAD_LINES] + [(*BAD_LINES[0], 2)],  # one case through the process pool
)
def test_bad_line_names_file_and_line_and_leaves_no_output(
    tmp_path: Path, sp_model: Path, corpus: list[str], line: str, problem: str, found: str, workers: int
) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", corpus[:40])
    lines = src.read_text().splitlines()
    lines.insert(22, line)  # becomes line 23
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    with pytest.raises(NevaError) as info:
        preprocess_jsonl(src, out / "corpus", sp_model, workers=workers, chunk_size=8)
    message = str(info.value)
    assert message.startswith(f"{src}:23: ")
    assert problem in message and found in message
    assert list(out.iterdir()) == []  # neither output nor temporary files


def test_failure_while_finalizing_leaves_neither_file(
    tmp_path: Path, sp_model: Path, corpus: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from megatron.core.datasets import indexed_dataset

    def broken_finalize(self: indexed_dataset.IndexedDatasetBuilder, idx_path: str) -> None:
        self.data_file.close()
        Path(idx_path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(indexed_dataset.IndexedDatasetBuilder, "finalize", broken_finalize)
    src = write_jsonl(tmp_path / "in.jsonl", corpus[:10])
    with pytest.raises(OSError, match="disk full"):
        preprocess_jsonl(src, tmp_path / "out" / "corpus", sp_model)
    assert list((tmp_path / "out").iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path: Path, sp_model: Path, corpus: list[str]) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", corpus[:3])
    first = preprocess_jsonl(src, tmp_path / "corpus", sp_model)
    with pytest.raises(NevaError, match=r"corpus_text_document\.bin already exists; pass --overwrite"):
        preprocess_jsonl(src, tmp_path / "corpus", sp_model)
    again = preprocess_jsonl(src, tmp_path / "corpus", sp_model, append_eod=True, overwrite=True)
    assert again.tokens == first.tokens + 3


def test_missing_input_is_an_error(tmp_path: Path, sp_model: Path) -> None:
    with pytest.raises(NevaError, match=r"input .*nope\.jsonl does not exist"):
        preprocess_jsonl(tmp_path / "nope.jsonl", tmp_path / "x", sp_model)


def test_count_tokens_equals_hand_sums(tmp_path: Path, sp_model: Path, corpus: list[str]) -> None:
    texts = corpus[:25]
    src = write_jsonl(tmp_path / "in.jsonl", texts)
    summary = preprocess_jsonl(src, tmp_path / "corpus", sp_model, append_eod=True)
    tok = TextTokenizer(sp_model)
    expected = sum(len(tok.encode(t)) + 1 for t in texts)
    for prefix in (summary.prefix, str(summary.prefix), summary.bin_path, summary.idx_path):
        count = count_tokens(prefix)
        assert (count.documents, count.sequences, count.tokens, count.dtype) == (25, 25, expected, "uint16")


def test_count_tokens_missing_files_names_both_paths(tmp_path: Path) -> None:
    (tmp_path / "half_text_document.bin").write_bytes(b"")
    with pytest.raises(NevaError) as info:
        count_tokens(tmp_path / "half_text_document")
    message = str(info.value)
    assert str(tmp_path / "half_text_document.bin") in message
    assert f"missing {tmp_path / 'half_text_document.idx'}" in message


def test_count_tokens_rejects_a_non_index(tmp_path: Path) -> None:
    (tmp_path / "junk.bin").write_bytes(b"")
    (tmp_path / "junk.idx").write_bytes(b"not an index at all, definitely not")
    with pytest.raises(NevaError, match=r"junk\.idx is not a readable Megatron index"):
        count_tokens(tmp_path / "junk")
