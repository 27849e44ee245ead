"""The NeMo drop-in ``scripts/add_special_tokens_to_sentencepiece.py`` with NeMo's flags."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import sentencepiece as spm

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "add_special_tokens_to_sentencepiece.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_userdefined_flag_and_nemo_output(sp_model: Path, tmp_path: Path) -> None:
    n = spm.SentencePieceProcessor(model_file=str(sp_model)).get_piece_size()
    out = tmp_path / "tokenizer_neva.model"
    tokens = [f"<extra_id_{i}>" for i in range(4)]
    proc = _run("--input_file", str(sp_model), "--output_file", str(out), "--is_userdefined", "--tokens", *tokens)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:4] == [f"INFO: Created token '{t}' at ID {n + i}" for i, t in enumerate(tokens)]
    assert f"INFO: New tokenizer vocab size: {n + 4}" in lines
    assert lines[-1] == f"INFO: Created new tokenizer at: {out}"
    sp = spm.SentencePieceProcessor(model_file=str(out))
    assert n + 2 in sp.encode("x <extra_id_2> y")


def test_default_is_control_like_nemo(sp_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "ctrl.model"
    proc = _run("--input_file", str(sp_model), "--output_file", str(out), "--tokens", "<extra_id_0>")
    assert proc.returncode == 0, proc.stderr
    sp = spm.SentencePieceProcessor(model_file=str(out))
    assert sp.is_control(sp.piece_to_id("<extra_id_0>"))


def test_conflict_exits_nonzero_with_message(sp_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.model"
    proc = _run("--input_file", str(sp_model), "--output_file", str(out), "--tokens", "▁red")
    assert proc.returncode == 2, proc.stderr
    assert "ERROR: token '▁red' already exists at ID" in proc.stderr
    assert not out.exists()
