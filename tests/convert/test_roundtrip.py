"""HF → .nemo → HF is bit-exact for every tensor (fp32), at TP=1 and TP=2, legacy and dist layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from neva_tools.checkpoint.nemo_archive import NemoArchive
from neva_tools.convert.hf_to_nemo import convert_hf_to_nemo
from neva_tools.convert.nemo_to_hf import convert_nemo_to_hf


def load_hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


@pytest.mark.parametrize(("tp", "fmt"), [(1, "legacy"), (2, "legacy"), (1, "dist"), (2, "dist")])
def test_round_trip_bit_exact(tiny_llm: Path, tmp_path: Path, tp: int, fmt: str) -> None:
    nemo = tmp_path / "model.nemo"
    convert_hf_to_nemo(str(tiny_llm), nemo, tp=tp, fmt=fmt)
    with NemoArchive(nemo) as archive:
        assert archive.layout == fmt
        if fmt == "legacy":
            assert archive.legacy_ranks() == (tp, 1)
    back = tmp_path / "back"
    convert_nemo_to_hf(nemo, back, max_shard_size="40KB")
    original, restored = load_hf_tensors(tiny_llm), load_hf_tensors(back)
    config = json.loads((tiny_llm / "config.json").read_text())
    if config["tie_word_embeddings"]:
        original.pop("lm_head.weight", None)
    assert sorted(restored) == sorted(original)
    for name, tensor in original.items():
        assert restored[name].dtype == tensor.dtype, name
        assert torch.equal(restored[name], tensor), name
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(original)
    assert (back / "tokenizer.model").read_bytes() == (tiny_llm / "tokenizer.model").read_bytes()


def test_exported_model_loads_in_transformers_with_same_logits(tiny_llm: Path, tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    nemo = tmp_path / "model.nemo"
    convert_hf_to_nemo(str(tiny_llm), nemo, tp=2)
    back = tmp_path / "back"
    convert_nemo_to_hf(nemo, back)
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_llm)).eval()
    out = AutoModelForCausalLM.from_pretrained(str(back)).eval()
    a, b = AutoConfig.from_pretrained(str(tiny_llm)).to_dict(), AutoConfig.from_pretrained(str(back)).to_dict()
    for key in ("num_hidden_layers", "num_key_value_heads", "rope_parameters", "tie_word_embeddings", "vocab_size"):
        assert a[key] == b[key], key
    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, out(ids).logits)
