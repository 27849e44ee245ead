"""Logit parity: a HF model vs the megatron-core GPTModel loaded from our .nemo (fp32), at TP=1 and TP=2."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from builders import megatron_logits
from dist_helpers import in_process_distributed, run_distributed

from neva_tools.convert.hf_to_nemo import convert_hf_to_nemo
from neva_tools.errors import NevaError

TOL = 1e-4


def _reference_logits(hf_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize(("saved_tp", "fmt"), [(1, "legacy"), (2, "legacy"), (1, "dist")])
def test_logits_match_hf_at_tp1(tiny_llm: Path, tmp_path: Path, ids: torch.Tensor, saved_tp: int, fmt: str) -> None:
    nemo = tmp_path / "m.nemo"
    convert_hf_to_nemo(str(tiny_llm), nemo, tp=saved_tp, fmt=fmt)
    ref = _reference_logits(tiny_llm, ids)
    with in_process_distributed():
        from neva_tools.model.from_nemo import load_gpt_from_nemo

        model, _, arch = load_gpt_from_nemo(nemo)
        with torch.no_grad():
            ours = model.eval()(ids, torch.arange(ids.shape[1]).expand_as(ids), None)[..., : arch.vocab_size]
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= TOL


@pytest.mark.parametrize(("saved_tp", "fmt"), [(2, "legacy"), (1, "legacy"), (2, "dist")])
def test_logits_match_hf_at_tp2(llama_hf: Path, tmp_path: Path, ids: torch.Tensor, saved_tp: int, fmt: str) -> None:
    nemo = tmp_path / "m.nemo"
    convert_hf_to_nemo(str(llama_hf), nemo, tp=saved_tp, fmt=fmt)
    ref = _reference_logits(llama_hf, ids)
    rank0, rank1 = run_distributed(megatron_logits, 2, str(nemo), ids)
    assert torch.equal(rank0, rank1)
    assert (rank0 - ref).abs().max().item() <= TOL


def test_tp2_parity_for_every_family(tiny_llm: Path, tmp_path: Path, ids: torch.Tensor) -> None:
    nemo = tmp_path / "m.nemo"
    convert_hf_to_nemo(str(tiny_llm), nemo, tp=2)
    ref = _reference_logits(tiny_llm, ids)
    rank0, _ = run_distributed(megatron_logits, 2, str(nemo), ids)
    assert (rank0 - ref).abs().max().item() <= TOL


def test_wrong_weights_are_listed(llama_hf: Path, tmp_path: Path) -> None:
    from neva_tools.checkpoint.nemo_archive import NemoArchive
    from neva_tools.checkpoint.nemo_writer import NemoWriter
    from neva_tools.model.from_nemo import load_gpt_from_nemo

    good = tmp_path / "good.nemo"
    convert_hf_to_nemo(str(llama_hf), good)
    with NemoArchive(good) as archive:
        cfg, state = archive.read_config(), archive.load_legacy()
    state.pop("model.decoder.layers.1.mlp.linear_fc2.weight")
    bad = tmp_path / "bad.nemo"
    with NemoWriter(bad) as writer:
        writer.add_yaml("model_config.yaml", cfg)
        writer.add_torch("model_weights.ckpt", state)
    with in_process_distributed(), pytest.raises(NevaError, match=r"missing: .*layers\.1\.mlp\.linear_fc2\.weight"):
        load_gpt_from_nemo(bad)


def test_dist_file_loads_through_megatron_sharded_state_dict(llama_hf: Path, tmp_path: Path) -> None:
    """Our dist keys are megatron-core's own: GPTModel.sharded_state_dict loads the file (same padding)."""
    from neva_tools.checkpoint.nemo_archive import NemoArchive
    from neva_tools.model.from_nemo import load_dist_native
    from neva_tools.model.gpt import build_gpt_model

    same, other = tmp_path / "tp1.nemo", tmp_path / "tp2.nemo"
    convert_hf_to_nemo(str(llama_hf), same, fmt="dist")
    convert_hf_to_nemo(str(llama_hf), other, fmt="dist", tp=2)
    with in_process_distributed(), NemoArchive(same) as a, NemoArchive(other) as b:
        cfg = {**a.read_config(), "tensor_model_parallel_size": 1}
        model = build_gpt_model(cfg, padded_vocab_size=384)
        for param in model.parameters():
            param.data.zero_()
        assert load_dist_native(model, a, padded=384)
        assert not load_dist_native(model, b, padded=384)  # stored with TP=2 padding (512 rows)
        ref = a.read_config()
    state = model.state_dict()
    assert state["embedding.word_embeddings.weight"][300:].abs().sum() == 0  # padding rows are zeros
    assert state["decoder.layers.1.pre_mlp_layernorm.weight"].abs().sum() > 0
    assert ref["num_layers"] == 2


def test_nemo_naming_variants_load(llama_hf: Path, tmp_path: Path, ids: torch.Tensor) -> None:
    """NeMo files with ``model.module.`` prefixes, local-spec norm names and TE ``_extra_state`` load the same."""
    from neva_tools.checkpoint.nemo_archive import NemoArchive
    from neva_tools.checkpoint.nemo_writer import NemoWriter
    from neva_tools.model.from_nemo import load_gpt_from_nemo

    good = tmp_path / "good.nemo"
    convert_hf_to_nemo(str(llama_hf), good)
    with NemoArchive(good) as archive:
        cfg, state = archive.read_config(), archive.load_legacy()
    renamed = {}
    for name, tensor in state.items():
        name = name.replace("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight")
        name = name.replace("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight")
        renamed[name.replace("model.", "model.module.", 1)] = tensor
    renamed["model.module.decoder.layers.0.self_attention.linear_qkv._extra_state"] = torch.zeros(1)
    variant = tmp_path / "variant.nemo"
    with NemoWriter(variant) as writer:
        writer.add_yaml("model_config.yaml", {"model": cfg})  # a model: wrapper is accepted too
        writer.add_torch("model_weights.ckpt", renamed)
    ref = _reference_logits(llama_hf, ids)
    with in_process_distributed():
        model, _, arch = load_gpt_from_nemo(variant)
        with torch.no_grad():
            ours = model.eval()(ids, torch.arange(ids.shape[1]).expand_as(ids), None)[..., : arch.vocab_size]
    assert (ours - ref).abs().max().item() <= TOL
