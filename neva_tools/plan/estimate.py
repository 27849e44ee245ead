"""Per-GPU memory of one parallel layout: every pipeline stage's weights, gradients, optimizer state and in-flight
activations, the fullest stage's total, a fit verdict against the card, and the largest micro batch that fits."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

from neva_tools.plan.activations import Batch, Recompute, in_flight, stage_activations
from neva_tools.plan.memory import StateBytes, state_bytes
from neva_tools.plan.model import PlannedModel

GiB = 1 << 30
#: Kept free for what the estimate leaves out: the CUDA context and NCCL buffers, allocator fragmentation, the
#: transient tensors of backward (gradients of activations), the optimizer step and the logits.
DEFAULT_RESERVE = 8 * GiB


@dataclass(frozen=True)
class Layout:
    """A run's parallel layout and training settings."""

    tp: int
    pp: int
    dp: int
    micro_batch: int
    global_batch: int
    vpp: int = 1
    precision: str = "bf16"
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    recompute: Recompute = field(default_factory=Recompute)

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def microbatches(self) -> int:
        """Micro-batches per optimizer step on each data-parallel rank."""
        return max(1, self.global_batch // (self.micro_batch * self.dp))


@dataclass(frozen=True)
class StageMemory:
    """One pipeline rank's bytes (the largest over its data-parallel ranks for the optimizer shards)."""

    pp_rank: int
    state: StateBytes
    activations: int  # in-flight micro-batches × what one saves
    recompute_peak: int
    in_flight: float

    @property
    def total(self) -> int:
        return self.state.total + self.activations + self.recompute_peak


@dataclass(frozen=True)
class Estimate:
    """The estimate of one layout: per stage, the worst GPU, and the verdict."""

    layout: Layout
    stages: tuple[StageMemory, ...]
    capacity: int
    reserve: int

    @property
    def peak(self) -> StageMemory:
        return max(self.stages, key=lambda stage: stage.total)

    @property
    def fits(self) -> bool:
        return self.peak.total + self.reserve <= self.capacity


@functools.lru_cache(maxsize=4096)
def _state(model: PlannedModel, tp: int, pp: int, vpp: int, pp_rank: int, dp: int, precision: str, distributed: bool,
           bucket_size: int | None, step_tensors: bool) -> StateBytes:  # fmt: skip
    chunks = model.rank_chunks(tp=tp, pp=pp, vpp=vpp, pp_rank=pp_rank)
    ranks = range(dp) if distributed else range(1)
    return max((state_bytes(chunks, precision=precision, dp=dp, dp_rank=r, distributed=distributed,
                            bucket_size=bucket_size, step_tensors=step_tensors, first_stage=pp_rank == 0)
                for r in ranks), key=lambda s: s.total)  # fmt: skip


def ddp_bucket_size(layout: Layout) -> int | None:
    """megatron-core DDP's default bucket size (elements) for ``wrap_model(bucket_size=None)``."""
    return max(40_000_000, 1_000_000 * layout.dp) if layout.overlap_grad_reduce else None


def estimate(model: PlannedModel, layout: Layout, batch: Batch, *, capacity: int, reserve: int = DEFAULT_RESERVE,
             cuda: bool = True, step_tensors: bool = False) -> Estimate:  # fmt: skip
    """Every pipeline stage of ``layout`` for ``batch`` rows of ``layout.micro_batch``."""
    batch = replace(batch, micro_batch=layout.micro_batch)
    per_stage = model.llm.num_layers // layout.pp
    stages = []
    for rank in range(layout.pp):
        state = _state(model, layout.tp, layout.pp, layout.vpp, rank, layout.dp, layout.precision,
                       layout.distributed_optimizer, ddp_bucket_size(layout), step_tensors)  # fmt: skip
        one = stage_activations(model, batch, tp=layout.tp, layers=per_stage, first=rank == 0,
                                last=rank == layout.pp - 1, precision=layout.precision, recompute=layout.recompute,
                                cuda=cuda)  # fmt: skip
        flight = in_flight(layout.pp, rank, layout.vpp, layout.microbatches)
        peak = one.recompute_peak // layout.vpp if layout.vpp > 1 else one.recompute_peak
        stages.append(StageMemory(rank, state, round(one.saved * flight), peak, flight))
    return Estimate(layout, tuple(stages), capacity, reserve)


def micro_batch_choices(layout: Layout) -> list[int]:
    """Micro batches that divide the global batch into whole steps at this DP size, smallest first."""
    per_rank = layout.global_batch // layout.dp if layout.global_batch % layout.dp == 0 else 0
    return [m for m in range(1, per_rank + 1) if per_rank % m == 0]


def largest_fitting_micro_batch(model: PlannedModel, layout: Layout, batch: Batch, **kwargs: int | bool) -> int | None:
    """The largest of :func:`micro_batch_choices` whose estimate fits (None: not even the smallest)."""
    best = None
    for micro in micro_batch_choices(layout):
        if not estimate(model, replace(layout, micro_batch=micro), batch, **kwargs).fits:  # type: ignore[arg-type]
            break
        best = micro
    return best
