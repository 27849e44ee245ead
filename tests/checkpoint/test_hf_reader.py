"""``HFCheckpoint``: dtypes and on-disk locations of safetensors tensors, for file-to-file copies."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from neva_tools.checkpoint.hf_reader import HFCheckpoint


def test_location_points_at_each_tensors_bytes(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16), "c": torch.arange(6, dtype=torch.int32)}
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with HFCheckpoint(tmp_path) as ckpt:
        for name, tensor in tensors.items():
            assert ckpt.dtype(name) == tensor.dtype
            file, offset = ckpt.location(name)
            with open(file, "rb") as fh:
                fh.seek(offset)
                assert fh.read(tensor.numel() * tensor.element_size()) == tensor.view(torch.uint8).numpy().tobytes()


def test_pytorch_bin_has_no_location(tmp_path: Path) -> None:
    torch.save({"a": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text("{}")
    with HFCheckpoint(tmp_path) as ckpt:
        assert ckpt.location("a") is None and ckpt.dtype("a") == torch.float32
