"""NeMo drop-in conversion scripts accept NeMo's flags and produce the same file as ``neva convert``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from neva_tools.checkpoint.nemo_archive import NemoArchive

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPTS / script), *args], capture_output=True, text=True)


def test_convert_llama_hf_to_nemo_flags(llama_hf: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.nemo"
    proc = _run("convert_llama_hf_to_nemo.py", "--input_name_or_path", str(llama_hf), "--output_path", str(out),
                "--precision", "bf16", "--hparams_file", "ignored.yaml", "--llama31", "True")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "ignoring NeMo options this tool does not need: --hparams_file ignored.yaml --llama31 True" in proc.stderr
    with NemoArchive(out) as archive:
        cfg = archive.read_config()
        state = archive.load_legacy()
    assert cfg["precision"] == "bf16" and cfg["mcore_gpt"] is True
    assert {t.dtype for t in state.values()} == {torch.bfloat16}


def test_convert_hf_llama_to_nemo_flags(llama_hf: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.nemo"
    proc = _run("convert_hf_llama_to_nemo.py", "--in-file", str(llama_hf), "--out-file", str(out))
    assert proc.returncode == 0, proc.stderr
    with NemoArchive(out) as archive:
        assert archive.read_config()["precision"] == 32
        assert "model.decoder.layers.1.mlp.linear_fc2.weight" in archive.load_legacy()
    bad = _run("convert_hf_llama_to_nemo.py", "--in-file", str(llama_hf), "--out-file", str(out), "--precision", "8")
    assert bad.returncode == 2 and "--precision '8' is not one of" in bad.stderr
