"""Pipeline stages as training builds them (``build_neva_model``/``build_gpt_model`` with ``vp_stage``, each chunk
wrapped by ``megatron_optim.wrap_model``, one optimizer over all): NeVA at PP 2 (tower and projector on the first
stage; frozen LLM and full finetune) and a GPT at PP 2 × VPP 2 hold exactly the bytes ``neva plan`` lists."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from dist_helpers import run_distributed
from plan_models import TINY_VISION, VOCAB, nt

from neva_tools.plan.memory import state_bytes
from neva_tools.plan.model import PlannedModel
from neva_tools.plan.shapes import LlmShape, VisionShape

LAYERS = 4
BUCKET = 3000
CASES = [
    ("bf16", "fused_adam", False),
    ("bf16", "distributed_fused_adam", True),
    ("32", "distributed_fused_adam", True),
]


def _models(kind: str, vpp: int | None) -> list[Any]:
    from neva_tools.model.gpt import build_gpt_model
    from neva_tools.model.neva import NevaParts, build_neva_model, freeze

    stages = [None] if vpp is None else list(range(vpp))
    if kind == "gpt":
        cfg = {**nt.TINY_GPT, "num_layers": LAYERS, "pipeline_model_parallel_size": 2,
               "virtual_pipeline_model_parallel_size": vpp}  # fmt: skip
        return [build_gpt_model(cfg, padded_vocab_size=VOCAB, vp_stage=s) for s in stages]
    llm = {**nt.LLM, "num_layers": LAYERS, "pipeline_model_parallel_size": 2}
    chunks = [build_neva_model(NevaParts(llm, VOCAB, nt.vision_config(1), nt.IMAGE, nt.PATCH))]
    freeze(chunks[0], llm=kind == "neva_stage1", vision=True)
    return chunks


def _runs(rank: int, world_size: int, kind: str, vpp: int | None) -> list[dict[str, Any]]:
    from megatron.core import parallel_state

    from neva_tools.model.cpu_compat import model_parallel_seed
    from neva_tools.model.parallel import destroy_distributed, init_distributed
    from neva_tools.train import megatron_optim as mo
    from neva_tools.train.optim import OptimSettings

    init_distributed(tp=1, pp=2, vpp=vpp, seed=1234)
    try:
        out = []
        for precision, name, overlap in CASES:
            model_parallel_seed(1234)
            models = _models(kind, vpp)
            names = [[(n, tuple(p.shape)) for n, p in m.named_parameters()] for m in models]
            wrapped = [c for m in models for c in mo.wrap_model(m, precision=precision,
                       use_distributed_optimizer=mo.uses_distributed_optimizer(name), overlap_grad_reduce=overlap,
                       bucket_size=BUCKET if overlap else None)]  # fmt: skip
            trained = [p for c in wrapped for p in c.parameters() if p.requires_grad]
            main = moments = 0
            # Stage 1 at PP > 1: the frozen LLM's later stage trains nothing, and build_optimizer refuses a rank
            # without trainable parameters, so there the optimizer is not built on any rank (its collectives span
            # both) and only weights and gradient buffers are compared; test_state_bytes covers its optimizer.
            if kind != "neva_stage1":
                optimizer = mo.build_optimizer(wrapped, OptimSettings(lr=1e-3), name=name)
                mo.zero_grad(wrapped, optimizer)
                sum(p.float().sum() for p in trained).mul(0.0).backward()
                mo.optimizer_step(wrapped, optimizer)
                state = mo.optimizer_state_bytes(optimizer, wrapped)
                main, moments = state.main_params, state.moments
            storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                        for c in wrapped for p in c.parameters()}  # fmt: skip
            grads = sum(b.grad_data.numel() * b.grad_data.element_size() for c in wrapped for b in c.buffers)
            out.append({"names": names, "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
                        "bytes": (sum(storages.values()), grads, main, moments)})  # fmt: skip
        return out
    finally:
        destroy_distributed()


def _planned(kind: str) -> PlannedModel:
    if kind == "gpt":
        return PlannedModel(LlmShape.from_nemo_config({**nt.TINY_GPT, "num_layers": LAYERS}, VOCAB, "test"))
    llm = LlmShape.from_nemo_config({**nt.LLM, "num_layers": LAYERS}, VOCAB, "test")
    return PlannedModel(llm, VisionShape(TINY_VISION, -1), freeze_llm=kind == "neva_stage1")


@pytest.mark.parametrize(("kind", "vpp"), [("gpt", 2), ("neva_stage1", None), ("neva_stage2", None)])
def test_pipeline_stage_bytes_equal_measured(kind: str, vpp: int | None) -> None:
    model = _planned(kind)
    for measured_cases in run_distributed(_runs, 2, kind, vpp, timeout=300):
        for (precision, name, overlap), measured in zip(CASES, measured_cases, strict=True):
            chunks = model.rank_chunks(tp=1, pp=2, vpp=vpp or 1, pp_rank=measured["pp_rank"])
            assert [[(p.name, p.shape) for p in c] for c in chunks] == measured["names"], kind
            planned = state_bytes(chunks, precision=precision, dp=1, distributed=name == "distributed_fused_adam",
                                  bucket_size=BUCKET if overlap else None, step_tensors=True,
                                  first_stage=measured["pp_rank"] == 0)  # fmt: skip
            got = (planned.weights, planned.gradients, planned.master_weights, planned.moments)
            if kind == "neva_stage1":
                got = (*got[:2], 0, 0)
                assert planned.gradients == 0 if measured["pp_rank"] == 1 else planned.gradients > 0
            assert got == measured["bytes"], (kind, precision, name, measured["pp_rank"], got)
