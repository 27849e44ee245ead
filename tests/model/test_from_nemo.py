"""Logit parity: a HF model vs the megatron-core GPTModel loaded from our .nemo (fp32), at TP=1 and TP=2."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from dist_helpers import in_process_distributed, run_distributed

from neva_tools.convert.hf_to_nemo import convert_hf_to_nemo
from neva_tools.errors import NevaError

TOL = 1e-4


def _reference_logits(hf_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def megatron_logits(rank: int, world_size: int, nemo: str, ids: torch.Tensor) -> torch.Tensor:
    """On each rank: init TP=world_size, load the .nemo, return full-vocabulary logits (padding cut)."""
    from neva_tools.model.from_nemo import load_gpt_from_nemo
    from neva_tools.model.parallel import destroy_distributed, init_distributed

    init_distributed(tp=world_size)
    try:
        model, _, arch = load_gpt_from_nemo(nemo)
        position_ids = torch.arange(ids.shape[1]).expand_as(ids)
        with torch.no_grad():
            logits = model.eval()(ids, position_ids, None, runtime_gather_output=True)
        return logits[..., : arch.vocab_size]
    finally:
        destroy_distributed()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("saved_tp", [1, 2])
def test_logits_match_hf_at_tp1(tiny_llm: Path, tmp_path: Path, ids: torch.Tensor, saved_tp: int) -> None:
    nemo = tmp_path / "m.nemo"
    convert_hf_to_nemo(str(tiny_llm), nemo, tp=saved_tp)
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
    from neva_tools.checkpoint.nemo_archive import NemoArchive, NemoWriter
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
