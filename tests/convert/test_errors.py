"""Bad input to the converter: clear errors naming what is wrong, and never a half-written output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import builders
import pytest
import torch
from safetensors.torch import load_file, save_file

from neva_tools.convert.hf_to_nemo import convert_hf_to_nemo
from neva_tools.errors import NevaError


@pytest.fixture
def llama_dir(tmp_path: Path, sp_model: Path) -> Path:
    return builders.build_tiny_llm("llama", tmp_path / "hf", sp_model=sp_model)


def _edit_weights(model: Path, edit) -> None:
    path = model / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_unknown_architecture_lists_supported(llama_dir: Path, tmp_path: Path) -> None:
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NevaError, match=r"'GPT2LMHeadModel'\] is not supported; supported families: LlamaForCausalLM"):
        convert_hf_to_nemo(str(llama_dir), tmp_path / "out.nemo")


def test_missing_extra_and_misshaped_tensors_are_listed(llama_dir: Path, tmp_path: Path) -> None:
    def edit(t: dict) -> None:
        del t["model.layers.1.mlp.up_proj.weight"]
        t["model.layers.0.mlp.surprise.weight"] = torch.zeros(2)
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 64)

    _edit_weights(llama_dir, edit)
    with pytest.raises(NevaError) as exc:
        convert_hf_to_nemo(str(llama_dir), tmp_path / "out.nemo")
    msg = str(exc.value)
    assert "missing tensors: model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected tensors: model.layers.0.mlp.surprise.weight" in msg
    assert "model.layers.0.self_attn.k_proj.weight has shape [8, 64], expected [32, 64]" in msg
    assert not (tmp_path / "out.nemo").exists()


def test_truncated_safetensors_names_the_file(llama_dir: Path, tmp_path: Path) -> None:
    path = llama_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(NevaError, match=r"model\.safetensors"):
        convert_hf_to_nemo(str(llama_dir), tmp_path / "out.nemo")


def test_tp_must_divide_heads_and_groups(llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(NevaError, match=r"tensor_model_parallel_size \(3\) must divide num_attention_heads \(4\)"):
        convert_hf_to_nemo(str(llama_dir), tmp_path / "out.nemo", tp=3)
    with pytest.raises(NevaError, match=r"tensor_model_parallel_size \(4\) must divide num_query_groups \(2\)"):
        convert_hf_to_nemo(str(llama_dir), tmp_path / "out.nemo", tp=4)


def test_existing_output_needs_overwrite(llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.nemo"
    convert_hf_to_nemo(str(llama_dir), out)
    with pytest.raises(NevaError, match="already exists; pass --overwrite"):
        convert_hf_to_nemo(str(llama_dir), out)
    convert_hf_to_nemo(str(llama_dir), out, overwrite=True)
    assert out.stat().st_size > 1000
    out.write_bytes(b"precious")  # not a .nemo: never replaced
    with pytest.raises(NevaError, match=r"is a file of 8 bytes that is not a \.nemo file"):
        convert_hf_to_nemo(str(llama_dir), out, overwrite=True)
    assert out.read_bytes() == b"precious"


def test_pytorch_bin_loaded_with_weights_only(llama_dir: Path, tmp_path: Path) -> None:
    tensors = load_file(str(llama_dir / "model.safetensors"))
    (llama_dir / "model.safetensors").unlink()
    torch.save(tensors, llama_dir / "pytorch_model.bin")
    convert_hf_to_nemo(str(llama_dir), tmp_path / "ok.nemo")
    (llama_dir / "pytorch_model.bin").write_bytes(b"not a torch file")
    with pytest.raises(NevaError, match=r"pytorch_model\.bin could not be loaded safely"):
        convert_hf_to_nemo(str(llama_dir), tmp_path / "bad.nemo")


def test_not_a_model_directory_or_repo_id(tmp_path: Path) -> None:
    with pytest.raises(NevaError, match=r"no config\.json"):
        convert_hf_to_nemo(str(tmp_path), tmp_path / "out.nemo")
    with pytest.raises(NevaError, match="neither a model directory nor a hub repo id"):
        convert_hf_to_nemo(str(tmp_path / "missing" / "dir" / "x"), tmp_path / "out.nemo")


def test_offline_hub_id_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    proc = subprocess.run(
        [sys.executable, "-m", "neva_tools", "convert", "hf-to-nemo", "--input", "nobody/tiny-llama",
         "--output", str(tmp_path / "out.nemo")],
        capture_output=True, text=True, env={**os.environ},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "nobody/tiny-llama is not in the local hub cache" in proc.stderr
    assert not (tmp_path / "out.nemo").exists()


def test_killed_conversion_leaves_no_nemo(tmp_path: Path, sp_model: Path) -> None:
    """SIGKILL mid-way (slowed down by a large model and TP=4): no .nemo appears, only a hidden temp file."""
    big = builders.build_tiny_llm("llama", tmp_path / "hf", sp_model=sp_model, hidden=512, layers=8)
    out = tmp_path / "out.nemo"
    proc = subprocess.Popen(
        [sys.executable, "-m", "neva_tools", "convert", "hf-to-nemo", "--input", str(big), "--output", str(out),
         "--tp", "2", "--no-progress"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.startswith(".out.nemo.tmp") for p in tmp_path.iterdir()):
        time.sleep(0.01)
    assert proc.poll() is None, "conversion finished before it could be interrupted"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
