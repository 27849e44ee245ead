"""Tensor parallelism on CPU: a TP=2 GPT over two gloo processes matches TP=1 (same seed, CPU-initialized weights)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from dist_helpers import DistributedRunError, run_distributed
from neva_tiny import TINY_GPT

SEED = 1234
VOCAB = 256


def _forward(tp: int, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Build the tiny GPT at ``tp`` (re-seeded) and return full-vocab logits, gathered logits and the loss."""
    from neva_tools.model.gpt import build_gpt_model, gather_logits
    from neva_tools.model.parallel import init_distributed

    init_distributed(tp=tp, seed=SEED)
    model = build_gpt_model({**TINY_GPT, "tensor_model_parallel_size": tp}, padded_vocab_size=VOCAB).eval()
    position_ids = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        parallel = model(tokens, position_ids, None)
        full = model(tokens, position_ids, None, runtime_gather_output=True)
        loss = model(tokens, position_ids, None, labels=tokens.roll(-1, dims=1))
    return {
        "parallel_shape": torch.tensor(parallel.shape),
        "logits": full,
        "gathered": gather_logits(parallel),
        "loss": loss,
    }


def tp1_then_tp2(rank: int, world_size: int, tokens: torch.Tensor) -> dict[str, Any]:
    """On each of 2 ranks: TP=1 (data-parallel 2), then TP=2, same seed; return both results."""
    return {"tp1": _forward(1, tokens), "tp2": _forward(2, tokens)}


def slurm_launch(rank: int, world_size: int) -> tuple[int, int, int]:
    """Pretend to be an srun task: only SLURM's variables (and MASTER_ADDR/MASTER_PORT) describe the job."""
    import os

    from megatron.core import parallel_state

    from neva_tools.model.parallel import init_distributed

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        del os.environ[name]
    os.environ.update(SLURM_PROCID=str(rank), SLURM_NTASKS=str(world_size), SLURM_LOCALID=str(rank))
    init_distributed(tp=2)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), tp_rank


def fails_on_rank_1(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("deliberate failure on rank 1")
    return rank


def test_tp2_logits_equal_tp1() -> None:
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    results = run_distributed(tp1_then_tp2, 2, tokens)
    for rank, result in enumerate(results):
        tp1, tp2 = result["tp1"], result["tp2"]
        assert tp1["logits"].shape == (2, 16, VOCAB)
        assert tp2["parallel_shape"].tolist() == [2, 16, VOCAB // 2]
        assert torch.allclose(tp2["logits"], tp1["logits"], atol=1e-5, rtol=0), f"rank {rank}"
        assert torch.allclose(tp2["gathered"], tp1["logits"], atol=1e-5, rtol=0), f"rank {rank}"
        assert torch.allclose(tp2["loss"], tp1["loss"], atol=1e-5, rtol=0), f"rank {rank}"
    assert torch.equal(results[0]["tp2"]["logits"], results[1]["tp2"]["logits"])


def test_slurm_launch() -> None:
    assert run_distributed(slurm_launch, 2) == [(0, 2, 0), (1, 2, 1)]


def test_run_distributed_reports_child_traceback() -> None:
    with pytest.raises(DistributedRunError, match="deliberate failure on rank 1") as info:
        run_distributed(fails_on_rank_1, 2)
    assert "rank 1 of 2" in str(info.value) and "ValueError" in str(info.value)
