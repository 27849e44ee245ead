"""Every TP × PP × DP layout a GPU count allows, each with its memory estimate and an estimated step time.

Step time = FLOPs of one optimizer step / (GPUs × peak TFLOP/s × MFU) × the pipeline bubble
``1 + (PP - 1) / (VPP × micro-batches per DP rank)``. FLOPs per step (``N`` parameters of a part, ``T`` tokens):
forward ``2·N·T`` plus attention ``4·T·s·q·L`` (QKᵀ and AV, ``q`` the query width, no causal discount); backward
twice the forward for a trained part, once for a frozen part that gradients still pass through (input gradients
only), nothing for a frozen part nothing trains before (the frozen vision tower); full recompute adds one LLM
forward, selective one attention forward. MFU is an assumption, printed with every result (``--mfu``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from neva_tools.errors import NevaError
from neva_tools.plan.activations import Batch
from neva_tools.plan.estimate import Estimate, Layout, estimate, largest_fitting_micro_batch
from neva_tools.plan.gpus import DEFAULT_MFU, GPUS  # noqa: F401 - re-exported
from neva_tools.plan.model import PlannedModel


@dataclass(frozen=True)
class Candidate:
    """One layout: its estimate at the config's micro batch, the largest micro batch that fits, and its time."""

    estimate: Estimate
    largest_micro_batch: int | None
    step_seconds: float
    flops: float


def step_flops(model: PlannedModel, batch: Batch, global_batch: int, recompute: str | None) -> float:
    """Training FLOPs of one optimizer step (``global_batch`` rows of ``batch``)."""
    llm = model.llm
    tokens = global_batch * batch.seq
    q = llm.heads * llm.kv_channels
    layer = 2 * (llm.hidden * (q + 2 * llm.groups * llm.kv_channels) + q * llm.hidden)
    layer += 2 * llm.hidden * llm.ffn * (3 if llm.gated else 2)
    dense = (layer * llm.num_layers + 2 * llm.hidden * llm.padded_vocab(1)) * tokens
    attention = 4 * tokens * batch.seq * q * llm.num_layers
    forward = dense + attention
    upstream = model.vision is not None and (not model.freeze_projector or not model.freeze_vision)
    backward = 2 * forward if not model.freeze_llm else forward if upstream else 0.0
    extra = forward if recompute == "full" else attention if recompute == "selective" else 0.0
    total = forward + backward + extra
    vision = model.vision
    if vision is not None:
        arch = vision.arch
        images = global_batch * batch.tiles
        h, t = arch.hidden_size, vision.tokens
        vit = images * vision.layers * (2 * t * (4 * h * h + 2 * h * arch.ffn_hidden_size) + 4 * t * t * h)
        total += vit * (1 if model.freeze_vision else 3 + (1 if recompute == "full" else 0))
        proj = (
            2
            * global_batch
            * batch.image_tokens
            * (arch.hidden_size * llm.hidden + (llm.hidden**2 if model.projector != "linear" else 0))
        )
        total += proj * (3 if not model.freeze_projector else 2 if not model.freeze_llm else 1)
    return float(total)


def layouts(model: PlannedModel, base: Layout, *, gpus_per_node: int, nodes: int) -> list[Layout]:
    """Every TP × PP × DP of ``gpus_per_node × nodes`` GPUs megatron-core can build: TP divides the heads, query
    groups and FFN (and the tower's) and stays in a node, PP divides the layers, DP divides the global batch."""
    gpus = gpus_per_node * nodes
    found = []
    for tp in range(1, gpus_per_node + 1):
        if gpus_per_node % tp:
            continue
        for pp in range(1, model.llm.num_layers + 1):
            if (gpus % (tp * pp)) or model.llm.num_layers % pp:
                continue
            dp = gpus // (tp * pp)
            if base.global_batch % dp:
                continue
            try:
                model.check(tp, pp)
            except NevaError:  # a layout megatron-core cannot build is no candidate
                continue
            vpp = base.vpp if pp > 1 and model.llm.num_layers % (pp * base.vpp) == 0 else 1
            micro = base.micro_batch if (base.global_batch // dp) % base.micro_batch == 0 else 1
            found.append(replace(base, tp=tp, pp=pp, dp=dp, vpp=vpp, micro_batch=micro))
    return found


def rank(model: PlannedModel, base: Layout, batch: Batch, *, gpus_per_node: int, nodes: int, capacity: int,
         reserve: int, tflops: float, mfu: float, cuda: bool = True) -> list[Candidate]:  # fmt: skip
    """:func:`layouts`, each estimated; those that fit (at the largest micro batch that fits) first, by step time."""
    out = []
    for layout in layouts(model, base, gpus_per_node=gpus_per_node, nodes=nodes):
        kwargs = {"capacity": capacity, "reserve": reserve, "cuda": cuda}
        best = largest_fitting_micro_batch(model, layout, batch, **kwargs)
        timed = replace(layout, micro_batch=min(best, layout.micro_batch)) if best else layout
        flops = step_flops(model, batch, layout.global_batch, layout.recompute.granularity)
        bubble = 1 + (timed.pp - 1) / (timed.vpp * timed.microbatches)
        seconds = flops / (layout.gpus * tflops * 1e12 * mfu) * bubble
        out.append(Candidate(estimate(model, layout, batch, **kwargs), best, seconds, flops))
    return sorted(out, key=lambda c: (c.largest_micro_batch is None, c.step_seconds))
