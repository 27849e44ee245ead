"""``neva tokenizer`` end to end through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm

from neva_tools.cli.main import main
from neva_tools.tokenizer.vocab import padded_vocab_size


def test_add_tokens_preset_prints_nemo_style_lines(
    sp_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    n = spm.SentencePieceProcessor(model_file=str(sp_model)).get_piece_size()
    out = tmp_path / "tokenizer_neva.model"
    assert main(["tokenizer", "add-tokens", "--input", str(sp_model), "--output", str(out), "--preset", "neva",
                 "--tp", "2"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert lines[:8] == [f"Created token '<extra_id_{i}>' at ID {n + i}" for i in range(8)]
    assert f"New tokenizer vocab size: {n + 8}" in lines
    assert f"Padded vocab size for TP=2 (multiple of 128x2): {padded_vocab_size(n + 8, 2)}" in lines
    assert lines[-1] == f"Created new tokenizer at: {out}"
    assert spm.SentencePieceProcessor(model_file=str(out)).get_piece_size() == n + 8


def test_add_tokens_rerun_says_noop(sp_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "a.model"
    main(["tokenizer", "add-tokens", "--input", str(sp_model), "--output", str(out), "--tokens", "<image>"])
    capsys.readouterr()
    assert main(["tokenizer", "add-tokens", "--input", str(out), "--output", str(out), "--in-place",
                 "--tokens", "<image>"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "Token '<image>' already present" in text and "Nothing to add" in text


def test_add_tokens_conflict_exit_code(sp_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "a.model"
    code = main(["tokenizer", "add-tokens", "--input", str(sp_model), "--output", str(out), "--tokens", "▁red"])
    assert code == 2
    assert "'▁red' already exists at ID" in capsys.readouterr().err
    assert not out.exists()


def test_inspect_json(sp_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tokenizer", "inspect", str(sp_model), "--json", "--text", "a red circle"]) == 0
    info = json.loads(capsys.readouterr().out)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    assert info["vocab_size"] == sp.get_piece_size()
    assert info["sample"]["ids"] == sp.encode("a red circle")


def test_inspect_text_output(hf_tokenizer_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tokenizer", "inspect", str(hf_tokenizer_dir), "--text", "a red circle"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("huggingface tokenizer at") and "sample: 'a red circle'" in out


def test_train_writes_loadable_model(corpus: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "captions.txt"
    text.write_text("\n".join(corpus))
    out = tmp_path / "tok.model"
    assert main(["tokenizer", "train", "--input", str(text), "--output", str(out), "--vocab-size", "300"]) == 0
    sp = spm.SentencePieceProcessor(model_file=str(out))
    assert sp.get_piece_size() == 300 and (sp.bos_id(), sp.eos_id()) == (1, 2)
    assert sp.decode(sp.encode(corpus[0])) == corpus[0]
