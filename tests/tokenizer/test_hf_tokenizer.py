"""Adding special tokens to a Hugging Face tokenizer directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from neva_tools.errors import NevaError
from neva_tools.tokenizer.add_tokens import add_tokens
from neva_tools.tokenizer.tokens import PRESETS

NEVA = PRESETS["neva"]


def test_tokens_added_as_special_and_matched_in_text(hf_tokenizer_dir: Path, tmp_path: Path) -> None:
    n = len(AutoTokenizer.from_pretrained(str(hf_tokenizer_dir)))
    out = tmp_path / "neva_tok"
    report = add_tokens(hf_tokenizer_dir, out, NEVA, "user_defined")
    assert report.kind == "huggingface"
    assert [r.id for r in report.results] == list(range(n, n + 8))
    assert report.vocab_size == n + 8
    tok = AutoTokenizer.from_pretrained(str(out))
    assert (out / "tokenizer.json").is_file()
    assert set(NEVA) <= set(tok.all_special_tokens)
    ids = tok.encode("a red circle<extra_id_3>top left", add_special_tokens=False)
    assert ids.count(n + 3) == 1
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == "aredcircletopleft"


def test_rerun_is_noop_and_keeps_ids(hf_tokenizer_dir: Path, tmp_path: Path) -> None:
    first = add_tokens(hf_tokenizer_dir, tmp_path / "a", NEVA, "user_defined")
    second = add_tokens(tmp_path / "a", tmp_path / "b", NEVA, "user_defined")
    assert not second.created
    assert [r.id for r in second.results] == [r.id for r in first.results]
    assert second.vocab_size == first.vocab_size


def test_in_place_keeps_other_files(hf_tokenizer_dir: Path, tmp_path: Path) -> None:
    work = tmp_path / "model"
    work.mkdir()
    for item in hf_tokenizer_dir.iterdir():
        (work / item.name).write_bytes(item.read_bytes())
    (work / "config.json").write_text("{}")
    report = add_tokens(work, work, NEVA[:2], "user_defined", in_place=True)
    assert len(report.created) == 2
    assert (work / "config.json").read_text() == "{}"
    assert AutoTokenizer.from_pretrained(str(work)).convert_tokens_to_ids("<extra_id_1>") == report.results[1].id
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_ordinary_token_conflict_and_control_refused(hf_tokenizer_dir: Path, tmp_path: Path) -> None:
    vocab = AutoTokenizer.from_pretrained(str(hf_tokenizer_dir)).get_vocab()
    with pytest.raises(NevaError, match=rf"'red' already exists at ID {vocab['red']} as an ordinary"):
        add_tokens(hf_tokenizer_dir, tmp_path / "x", ["red"], "user_defined")
    with pytest.raises(NevaError, match="sentencepiece models only"):
        add_tokens(hf_tokenizer_dir, tmp_path / "y", NEVA, "control")
    assert os.listdir(tmp_path) == []


def test_directory_without_tokenizer(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NevaError, match="holds no Hugging Face tokenizer"):
        add_tokens(empty, tmp_path / "out", NEVA, "user_defined")
