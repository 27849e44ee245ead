"""The drop-in scripts (NeMo's, Megatron-LM's flags) run inside the CLI's error boundary: an unwritable output, a
broken input file or Ctrl-C is one line (``ERROR: ...`` exit 2; ``neva: interrupted`` exit 130), never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from neva_tools.cli import boundary

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"


@pytest.fixture(scope="module")
def nemo_tp1(llama_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from neva_tools.convert.hf_to_nemo import convert_hf_to_nemo

    out = tmp_path_factory.mktemp("dropin") / "tp1.nemo"
    convert_hf_to_nemo(str(llama_hf), out)
    return out


def _run(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPTS / script), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=240)  # fmt: skip


def _one_error(proc: subprocess.CompletedProcess[str], *wanted: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR: ")]
    assert len(errors) == 1, proc.stderr
    for text in wanted:
        assert text in errors[0], errors[0]


def test_unwritable_output_of_nemo_converter(llama_hf: Path) -> None:
    proc = _run("convert_llama_hf_to_nemo.py", "--input_name_or_path", str(llama_hf), "--output_path", "/proc/x.nemo")
    _one_error(proc, "/proc/x.nemo")


def test_broken_config_json_of_nemo_converter(llama_hf: Path, tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    shutil.copytree(llama_hf, hf)
    (hf / "config.json").write_bytes(b'{"num_attention_heads": 4,\xff}')
    out = tmp_path / "out"
    out.mkdir()
    proc = _run("convert_hf_llama_to_nemo.py", "--in-file", str(hf), "--out-file", str(out / "m.nemo"))
    _one_error(proc, "config.json")
    assert os.listdir(out) == []


def test_unwritable_output_of_repartition_dropin(nemo_tp1: Path) -> None:
    proc = _run("megatron_change_num_partitions.py", "--model_file", str(nemo_tp1), "--target_file", "/proc/y.nemo",
                "--tensor_model_parallel_size", "1", "--target_tensor_model_parallel_size", "2")  # fmt: skip
    _one_error(proc, "/proc/y.nemo")


def test_preprocess_dropin_non_utf8_input_names_the_line(tmp_path: Path, sp_model: Path) -> None:
    data = tmp_path / "docs.jsonl"
    data.write_bytes(json.dumps({"text": "a red circle"}).encode() + b'\n{"text": "bad \xff byte"}\n')
    proc = _run("preprocess_data.py", "--input", str(data), "--output-prefix", str(tmp_path / "out"),
                "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(sp_model),
                "--json-keys", "text", "--workers", "1")  # fmt: skip
    _one_error(proc, "docs.jsonl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]


POINTS = ["call:neva_tools.convert.hf_to_nemo:convert_hf_to_nemo@group", "import:torch.nn@group"]


@pytest.mark.parametrize("point", POINTS)
def test_ctrl_c_in_a_dropin_is_one_line_and_130(point: str, llama_hf: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, boundary.INTERRUPT_AT_VAR: point}
    proc = subprocess.Popen([sys.executable, str(SCRIPTS / "convert_llama_hf_to_nemo.py"), "--input_name_or_path",
                             str(llama_hf), "--output_path", str(out / "m.nemo")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    _, err = proc.communicate(timeout=240)
    assert (proc.returncode, err.splitlines()[-1:]) == (130, ["neva: interrupted"]), err
    assert "Traceback" not in err, err
    assert os.listdir(out) == []
