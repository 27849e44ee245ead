"""Optimizer settings (NeMo's ``model.optim``) and the parts of a NeVA model: separate learning rates for projector,
vision encoder and LLM; frozen parameters get no group (so no optimizer state); norms and biases without weight decay
by default. The trainer uses megatron-core's optimizer (:mod:`neva_tools.train.megatron_optim`);
:func:`build_optimizer` (torch AdamW over the same groups) remains for benchmarks and model tests."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

#: Name prefixes of the three parts of a megatron-core ``LLaVAModel``.
PARTS = {"projector": "vision_projection.", "vision": "vision_model.", "llm": "language_model."}


@dataclass(frozen=True)
class OptimSettings:
    """NeMo's ``optim`` section plus per-part rates (the Qwen-VL seed's ``mm_projector_lr``, ``vision_tower_lr``).

    ``name`` is ``fused_adam`` or ``distributed_fused_adam`` (state sharded over the data-parallel group);
    ``overlap_grad_reduce`` reduces gradient buckets during backward, ``overlap_param_gather``
    (``distributed_fused_adam`` only) all-gathers updated weights during the next forward.
    """

    lr: float
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    projector_lr: float | None = None
    vision_lr: float | None = None
    llm_lr: float | None = None
    decay_norms_and_biases: bool = False
    name: str = "fused_adam"
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False


def part_of(name: str) -> str:
    """``projector``, ``vision`` or ``llm`` (a plain GPT model's parameters count as ``llm``)."""
    for part, prefix in PARTS.items():
        if name.startswith(prefix):
            return part
    return "llm"


def _no_decay(name: str, param: torch.Tensor) -> bool:
    return param.dim() == 1 or name.endswith(".bias") or "norm" in name


def param_groups(named: Iterable[tuple[str, torch.nn.Parameter]], settings: OptimSettings) -> list[dict]:
    """Groups keyed by (part, decay); only parameters with ``requires_grad`` are included."""
    rates = {"projector": settings.projector_lr, "vision": settings.vision_lr, "llm": settings.llm_lr}
    groups: dict[tuple[str, bool], dict] = {}
    for name, param in named:
        if not param.requires_grad:
            continue
        part = part_of(name)
        decay = settings.decay_norms_and_biases or not _no_decay(name, param)
        group = groups.setdefault((part, decay), {
            "params": [], "names": [], "part": part,
            "lr": rates[part] if rates[part] is not None else settings.lr,
            "weight_decay": settings.weight_decay if decay else 0.0,
        })  # fmt: skip
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def build_optimizer(model: torch.nn.Module, settings: OptimSettings) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` over the trainable parameters (megatron-core's distributed optimizer is CUDA-only)."""
    groups = param_groups(model.named_parameters(), settings)
    if not groups:
        raise ValueError("the model has no trainable parameters: check the freeze settings")
    # fused: one kernel per parameter (CPU and CUDA), no per-step temporaries the size of each parameter
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=settings.lr, betas=settings.betas, eps=settings.eps,
                             weight_decay=settings.weight_decay, fused=fused or None)  # fmt: skip
