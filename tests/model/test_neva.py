"""NeVA on megatron-core: forward/backward, freezing per stage, TP=2 training step equals TP=1."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from dist_helpers import run_distributed
from neva_tiny import train_steps

from neva_tools.checkpoint.tp import shard
from neva_tools.mappings.base import Split


def test_pretrain_stage_changes_only_the_projector() -> None:
    result = run_distributed(train_steps, 1, 2, True)[0]
    changed = {k for k in result["before"] if not torch.equal(result["before"][k], result["after"][k])}
    assert changed and all(k.startswith("vision_projection.") for k in changed)
    assert all(n.startswith("vision_projection.") for n in result["grads"])  # frozen: no grads
    assert result["state"] == {n for n in result["meta"] if n.startswith("vision_projection.")}  # no optimizer state


def test_finetune_stage_trains_llm_and_projector_not_vision() -> None:
    result = run_distributed(train_steps, 1, 1, False)[0]
    changed = {k.split(".")[0] for k in result["before"] if not torch.equal(result["before"][k], result["after"][k])}
    assert changed == {"language_model", "vision_projection"}
    assert result["losses"][0] > 0


def _expected_shard(name: str, full: torch.Tensor, meta: tuple[bool, int], rank: int) -> torch.Tensor:
    parallel, dim = meta
    if not parallel:
        return full
    if name.startswith("language_model.") and "linear_fc1.weight" in name:
        return shard(full, Split.GATED_MLP, 2, rank)
    return torch.chunk(full, 2, dim=dim)[rank]


def test_tp2_training_steps_equal_tp1() -> None:
    tp1 = run_distributed(train_steps, 1, 2, False)[0]
    tp2 = run_distributed(train_steps, 2, 2, False)
    for rank, result in enumerate(tp2):
        assert max(abs(a - b) for a, b in zip(result["losses"], tp1["losses"], strict=True)) <= 1e-5
        for name, tensor in result["after"].items():
            meta = result["meta"].get(name, (False, -1))
            expected = _expected_shard(name, tp1["after"][name], meta, rank)
            assert expected.shape == tensor.shape, name
            assert (expected - tensor).abs().max().item() <= 1e-5, name
