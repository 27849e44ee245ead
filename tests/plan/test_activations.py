"""``neva plan``'s activation estimate against what autograd saves (``torch.autograd.graph.saved_tensors_hooks``:
unique storages, parameters excluded) in one forward pass of tiny fp32 models on CPU: GPTs and NeVAs (frozen LLM,
full finetune, trained tower) at several micro batches and sequence lengths, without recompute and with selective,
full uniform and full block recompute. Within 15%."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from dist_helpers import in_process_distributed, run_distributed
from plan_models import BIASED_GPT, VOCAB, build_gpt, nt, planned_gpt, planned_neva

from neva_tools.plan.activations import Batch, Recompute, stage_activations

RECOMPUTE = {
    "none": ({}, Recompute()),
    "selective": ({"activations_checkpoint_granularity": "selective"}, Recompute("selective")),
    "full_uniform": ({"activations_checkpoint_granularity": "full", "activations_checkpoint_method": "uniform",
                      "activations_checkpoint_num_layers": 1}, Recompute("full", "uniform", 1)),
    "full_block": ({"activations_checkpoint_granularity": "full", "activations_checkpoint_method": "block",
                    "activations_checkpoint_num_layers": 1}, Recompute("full", "block", 1)),
}  # fmt: skip
GPT = {**nt.TINY_GPT, "num_layers": 3, "encoder_seq_length": 256, "max_position_embeddings": 256}


@pytest.fixture(scope="module")
def dist() -> Iterator[None]:
    with in_process_distributed(tp=1):
        yield


def saved_bytes(model: torch.nn.Module, run: Any) -> int:
    """Unique storage bytes autograd saves while ``run()`` runs forward (parameters excluded); backward follows."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() and storage.data_ptr() not in params:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = run()
    loss.backward()
    return sum(seen.values())


@pytest.mark.parametrize("recompute", list(RECOMPUTE))
@pytest.mark.parametrize("cfg_name", ["gpt", "biased_gpt"])
def test_gpt_activations_within_15_percent(dist: None, cfg_name: str, recompute: str) -> None:
    keys, setting = RECOMPUTE[recompute]
    base = GPT if cfg_name == "gpt" else {**BIASED_GPT, **{k: GPT[k] for k in ("num_layers", "encoder_seq_length")}}
    cfg = {**base, **keys}
    planned = planned_gpt(cfg)
    model = build_gpt(cfg, tp=1, pp=1, pp_rank=0)
    for b, s in ((1, 32), (4, 32), (2, 160)):
        ids = torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(s))
        pos = torch.arange(s).expand(b, s)
        measured = saved_bytes(model, lambda ids=ids, pos=pos: model(ids, pos, None, labels=ids).float().mean())
        estimate = stage_activations(planned, Batch(b, s), tp=1, layers=cfg["num_layers"], first=True, last=True,
                                     precision="32", recompute=setting, cuda=False)  # fmt: skip
        assert abs(estimate.saved / measured - 1) <= 0.15, (b, s, estimate.saved, measured)


def _neva_batch(b: int, text: int) -> dict[str, torch.Tensor]:
    from neva_tools.data.templates import IMAGE_TOKEN_INDEX

    g = torch.Generator().manual_seed(text)
    ids = torch.randint(3, VOCAB, (b, text), generator=g)
    ids[:, 1] = IMAGE_TOKEN_INDEX
    labels = torch.randint(3, VOCAB, (b, text), generator=g)
    labels[:, :2] = -100
    return {"images": torch.randn(b, 3, nt.IMAGE, nt.IMAGE, generator=g), "input_ids": ids, "labels": labels,
            "position_ids": torch.arange(text).expand(b, text)}  # fmt: skip


@pytest.mark.parametrize("recompute", ["none", "selective", "full_uniform"])
@pytest.mark.parametrize("stage", ["stage1", "stage2", "tower"])
def test_neva_activations_within_15_percent(dist: None, stage: str, recompute: str) -> None:
    from neva_tools.model.recompute import apply_recompute

    keys, setting = RECOMPUTE[recompute]
    freeze_llm, freeze_vision = stage == "stage1", stage != "tower"
    planned = planned_neva(freeze_llm=freeze_llm, freeze_vision=freeze_vision)
    from neva_tools.model.neva import NevaParts, build_neva_model, freeze

    parts = NevaParts({**nt.LLM, **keys}, VOCAB, apply_recompute(nt.vision_config(1), keys), nt.IMAGE, nt.PATCH)
    model = build_neva_model(parts)
    freeze(model, llm=freeze_llm, vision=freeze_vision)
    patches = (nt.IMAGE // nt.PATCH) ** 2
    for b, text in ((1, 24), (3, 24), (2, 100)):
        batch = _neva_batch(b, text)
        measured = saved_bytes(model, lambda batch=batch: nt.loss_of(model, batch))
        seq = text - 1 + patches
        shape = Batch(b, seq, tiles=1, image_tokens=patches, labelled=text - 2)
        estimate = stage_activations(planned, shape, tp=1, layers=nt.LLM["num_layers"], first=True, last=True,
                                     precision="32", recompute=setting, cuda=False)  # fmt: skip
        assert abs(estimate.saved / measured - 1) <= 0.15, (b, text, estimate.saved, measured)


def _tp2_saved(rank: int, world_size: int, cases: list[tuple[str, str, int, int]]) -> list[int]:
    """At TP 2: the saved bytes of each (model, recompute, micro batch, length) case on this rank."""
    from neva_tools.model.parallel import destroy_distributed, init_distributed
    from neva_tools.model.recompute import apply_recompute

    init_distributed(tp=2, seed=1234)
    try:
        out = []
        for kind, recompute, b, length in cases:
            keys = RECOMPUTE[recompute][0]
            if kind == "gpt":
                model = build_gpt({**GPT, **keys}, tp=2, pp=1, pp_rank=0)
                ids = torch.randint(0, VOCAB, (b, length), generator=torch.Generator().manual_seed(length))
                pos = torch.arange(length).expand(b, length)
                out.append(saved_bytes(model, lambda m=model, i=ids, p=pos: m(i, p, None, labels=i).float().mean()))
                continue
            from neva_tools.model.neva import NevaParts, build_neva_model, freeze

            llm = {**nt.LLM, **keys, "tensor_model_parallel_size": 2}
            model = build_neva_model(NevaParts(llm, VOCAB, apply_recompute(nt.vision_config(2), keys), nt.IMAGE,
                                               nt.PATCH))  # fmt: skip
            freeze(model, llm=kind == "neva_stage1", vision=True)
            batch = _neva_batch(b, length)
            out.append(saved_bytes(model, lambda m=model, x=batch: nt.loss_of(m, x)))
        return out
    finally:
        destroy_distributed()


TP2_CASES = [("gpt", "none", 2, 64), ("gpt", "full_uniform", 2, 64), ("neva_stage1", "none", 2, 60),
             ("neva_stage2", "none", 2, 60), ("neva_stage2", "selective", 1, 100)]  # fmt: skip


def test_activations_at_tp2_within_15_percent() -> None:
    """Tensor parallelism splits attention and MLP tensors; norms and column-parallel linear inputs stay whole."""
    measured = run_distributed(_tp2_saved, 2, TP2_CASES, timeout=300)
    patches = (nt.IMAGE // nt.PATCH) ** 2
    for index, (kind, recompute, b, length) in enumerate(TP2_CASES):
        if kind == "gpt":
            planned, shape = planned_gpt(GPT), Batch(b, length)
        else:
            planned = planned_neva(freeze_llm=kind == "neva_stage1")
            shape = Batch(b, length - 1 + patches, tiles=1, image_tokens=patches, labelled=length - 2)
        estimate = stage_activations(planned, shape, tp=2, layers=planned.llm.num_layers, first=True, last=True,
                                     precision="32", recompute=RECOMPUTE[recompute][1], cuda=False)  # fmt: skip
        for rank_bytes in (measured[0][index], measured[1][index]):
            assert abs(estimate.saved / rank_bytes - 1) <= 0.15, (kind, recompute, estimate.saved, rank_bytes)
