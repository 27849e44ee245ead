"""``neva plan``'s weights, gradients and optimizer bytes equal what training holds per rank, exactly: tiny GPTs and
NeVAs built, wrapped and stepped as training does (``megatron_optim.wrap_model``/``build_optimizer``) on gloo ranks,
at TP 2, DP 2 and PP 2, plain and distributed Adam, bf16 and fp32, frozen LLM (stage 1) and full finetune."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from dist_helpers import run_distributed
from plan_models import BIASED_GPT, build_gpt, build_neva, planned_gpt, planned_neva

from neva_tools.plan.memory import state_bytes

BUCKET = 3000  # elements: several DDP buckets with overlap_grad_reduce


def _measure(model: Any, precision: str, optimizer_name: str, overlap: bool) -> dict[str, Any]:
    """One training step of ``model``; the bytes this rank holds and its parameters' (name, shape)."""
    import torch

    from neva_tools.train import megatron_optim as mo
    from neva_tools.train.optim import OptimSettings

    names = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    distributed = mo.uses_distributed_optimizer(optimizer_name)
    chunks = mo.wrap_model(model, precision=precision, use_distributed_optimizer=distributed,
                           overlap_grad_reduce=overlap, bucket_size=BUCKET if overlap else None)  # fmt: skip
    optimizer = mo.build_optimizer(chunks, OptimSettings(lr=1e-3), name=optimizer_name)
    mo.zero_grad(chunks, optimizer)
    loss = sum(p.float().sum() for p in chunks[0].parameters() if p.requires_grad) * 0.0
    loss.backward()
    mo.optimizer_step(chunks, optimizer)
    params = list(chunks[0].parameters())
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in params}
    ddp = chunks[0]
    grads = sum(b.grad_data.numel() * b.grad_data.element_size() for b in ddp.buffers)
    state = mo.optimizer_state_bytes(optimizer, chunks)
    assert torch.optim.AdamW is __import__("megatron.core.optimizer", fromlist=["Adam"]).Adam  # CPU: torch's Adam
    return {"names": names, "bytes": (sum(storages.values()), grads, state.main_params, state.moments)}


def _runs(rank: int, world_size: int, tp: int, pp: int, cases: list[tuple[str, str, str, bool]]) -> list[Any]:
    """On a TP × PP × DP grid: each case (model, precision, optimizer, overlap) measured on this rank."""
    from megatron.core import parallel_state

    from neva_tools.model.cpu_compat import model_parallel_seed
    from neva_tools.model.parallel import destroy_distributed, init_distributed

    init_distributed(tp=tp, pp=pp, seed=1234)
    try:
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        dp_rank = parallel_state.get_data_parallel_rank()
        out = []
        for kind, precision, optimizer_name, overlap in cases:
            model_parallel_seed(1234)
            if kind.startswith("neva"):
                model = build_neva(tp, freeze_llm=kind == "neva_stage1", freeze_vision=kind != "neva_tower")
            else:
                model = build_gpt(BIASED_GPT if kind == "biased_gpt" else _gpt_cfg(), tp=tp, pp=pp, pp_rank=pp_rank)
            out.append({**_measure(model, precision, optimizer_name, overlap), "pp_rank": pp_rank, "dp_rank": dp_rank})
        return out
    finally:
        destroy_distributed()


def _gpt_cfg() -> dict[str, Any]:
    from plan_models import nt

    return nt.TINY_GPT


def _planned(kind: str) -> Any:
    if kind.startswith("neva"):
        return planned_neva(freeze_llm=kind == "neva_stage1", freeze_vision=kind != "neva_tower")
    return planned_gpt(BIASED_GPT if kind == "biased_gpt" else _gpt_cfg())


CASES = [(kind, precision, name, overlap)
         for kind in ("gpt", "biased_gpt", "neva_stage1", "neva_stage2", "neva_tower")
         for precision, name, overlap in (("bf16", "fused_adam", False), ("32", "distributed_fused_adam", True),
                                          ("bf16", "distributed_fused_adam", True))
         if precision == "bf16" or not kind.startswith("neva")]  # fmt: skip
PP_CASES = [(kind, precision, name, overlap) for kind in ("gpt", "biased_gpt")
            for precision, name, overlap in (("bf16", "fused_adam", False), ("bf16", "distributed_fused_adam", True),
                                             ("32", "fused_adam", True))]  # fmt: skip


#: (tp, pp, dp) → the cases measured there: every case at TP 2; at DP 2 those whose state DP shards (the distributed
#: optimizer); at PP 2 the GPTs (tied embeddings included).
GRIDS = {(2, 1, 1): CASES, (1, 1, 2): [c for c in CASES if c[2] == "distributed_fused_adam"], (1, 2, 1): PP_CASES}


@pytest.mark.parametrize("grid", list(GRIDS), ids=["tp2", "dp2", "pp2"])
def test_planned_state_bytes_equal_measured(grid: tuple[int, int, int]) -> None:
    """Per rank and case: the plan's parameter list is the model's (names, shapes, order) and its weights, gradient
    buffers, master weights and Adam moments are the measured bytes."""
    tp, pp, dp = grid
    cases = GRIDS[grid]
    for rank_results in run_distributed(_runs, 2, tp, pp, cases, timeout=300):
        for (kind, precision, name, overlap), measured in zip(cases, rank_results, strict=True):
            model = _planned(kind)
            chunks = model.rank_chunks(tp=tp, pp=pp, pp_rank=measured["pp_rank"])
            assert [(p.name, p.shape) for p in chunks[0]] == measured["names"], kind
            planned = state_bytes(chunks, precision=precision, dp=dp, dp_rank=measured["dp_rank"],
                                  distributed=name == "distributed_fused_adam", bucket_size=BUCKET if overlap else None,
                                  step_tensors=True, first_stage=measured["pp_rank"] == 0)  # fmt: skip
            got = (planned.weights, planned.gradients, planned.master_weights, planned.moments)
            assert got == measured["bytes"], (kind, precision, name, overlap, measured["pp_rank"], got)


def test_frozen_parts_carry_no_gradients_or_optimizer_state() -> None:
    """Stage 1 (LLM and tower frozen) holds gradients and state for the projector only."""
    stage1, full = planned_neva(freeze_llm=True), planned_neva(freeze_llm=False)
    s1 = state_bytes(stage1.rank_chunks(tp=1), precision="bf16", dp=1)
    s2 = state_bytes(full.rank_chunks(tp=1), precision="bf16", dp=1)
    projector = sum(p.numel for p in stage1.rank_chunks(tp=1)[0] if p.name.startswith("vision_projection."))
    assert s1.gradients == 4 * projector and s1.master_weights == 4 * projector and s1.moments == 8 * projector
    assert s1.weights == s2.weights and s2.gradients > 10 * s1.gradients
