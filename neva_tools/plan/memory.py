"""Weights, gradients and optimizer state per rank, to the byte, as megatron-core lays them out.

Training wraps the model as :func:`neva_tools.train.megatron_optim.wrap_model` does: ``Float16Module`` casts every
parameter (frozen ones too) to the run's 16-bit dtype; megatron-core's ``DistributedDataParallel`` puts the
*trainable* parameters' gradients in contiguous fp32 buffers (``grad_reduce_in_fp32=True``), filled in reverse
registration order. With the distributed optimizer it pads every parameter's start to 64 elements and every bucket's
end to ``lcm(DP, 128)`` elements, keeps the parameters themselves in a buffer of the same layout, and each DP rank
owns one ``1/DP`` slice of each bucket (:func:`buffer_layout` mirrors ``_ParamAndGradBuffer``). Buckets exist only
with ``overlap_grad_reduce`` (``bucket_size`` elements, megatron-core's default ``max(4e7, 1e6·DP)``) and only on
the first pipeline stage (DDP turns them off elsewhere); otherwise one bucket. Training wraps each interleaved model
chunk on its own (``neva_tools.train.module``), so each has buffers of its own. A tied embedding's copies (pipeline
> 1) get a bucket of their own.

Optimizer state (megatron-core's Adam): fp32 ``exp_avg`` and ``exp_avg_sq`` per trained element and, for 16-bit
weights, an fp32 master copy; with the distributed optimizer only for the elements of this rank's slices. torch's
``AdamW`` (megatron-core's fallback without Transformer Engine or apex, as on the CPU) also keeps a 4-byte ``step``
per parameter piece (``step_tensors``); the fused Adams of Transformer Engine and apex keep it per group.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from neva_tools.plan.params import Param

#: Bytes per element of the parameters at each ``trainer.precision`` (``neva_tools.train.megatron_optim``'s names).
PARAM_BYTES = {"32": 4, "bf16": 2, "fp16": 2}
GRAD_BYTES = 4  # grad_reduce_in_fp32
STEP_BYTES = 4  # torch AdamW's 0-d fp32 step tensor


@dataclass(frozen=True)
class Bucket:
    """One DDP bucket: its [start, end) in the buffer and the [start, end) of each of its parameters."""

    start: int
    end: int
    params: tuple[tuple[int, int], ...]


def buffer_layout(params: Sequence[Param], *, dp: int, distributed: bool, bucket_size: int | None) -> list[Bucket]:
    """megatron-core ``_ParamAndGradBuffer``'s buckets for the trainable ``params`` (registration order)."""
    pad_end = math.lcm(dp, 128) if distributed else 1
    buckets: list[Bucket] = []
    start = bucket_start = 0
    current: list[tuple[int, int]] = []
    end = 0

    def close(end_index: int) -> int:
        nonlocal bucket_start, current
        bucket_end = -(-end_index // pad_end) * pad_end
        buckets.append(Bucket(bucket_start, bucket_end, tuple(current)))
        bucket_start, current = bucket_end, []
        return bucket_end

    for param in [p for p in params if p.trainable][::-1]:
        if distributed:
            start = -(-start // 64) * 64
        alone = param.shared_embedding and distributed
        if alone and current:
            start = close(start)
        end = start + param.numel
        current.append((start, end))
        full = bucket_size is not None and end - bucket_start >= bucket_size
        start = close(end) if full or alone else end
    if current:
        close(end)
    return buckets


@dataclass(frozen=True)
class StateBytes:
    """Bytes one rank holds for its parameters, their gradients and the optimizer."""

    weights: int
    gradients: int
    master_weights: int
    moments: int  # Adam's two moments (and step tensors)

    @property
    def optimizer(self) -> int:
        return self.master_weights + self.moments

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer


def state_bytes(chunks: Sequence[Sequence[Param]], *, precision: str, dp: int, dp_rank: int = 0,
                distributed: bool = False, bucket_size: int | None = None, step_tensors: bool = False,
                first_stage: bool = True) -> StateBytes:  # fmt: skip
    """:class:`StateBytes` of one rank holding the model ``chunks`` (one per virtual pipeline stage).

    ``bucket_size``: DDP's (None without ``overlap_grad_reduce``); it applies on the first stage only.
    """
    pbytes = PARAM_BYTES[precision]
    weights = gradients = master = moments = 0
    step = STEP_BYTES if step_tensors else 0
    for chunk in chunks:
        size = bucket_size if first_stage else None
        buckets = buffer_layout(chunk, dp=dp, distributed=distributed, bucket_size=size)
        numel = buckets[-1].end if buckets else 0
        trained = sum(p.numel for p in chunk if p.trainable)
        frozen = sum(p.numel for p in chunk if not p.trainable)
        weights += (numel if distributed else trained) * pbytes + frozen * pbytes
        gradients += numel * GRAD_BYTES
        if not distributed:
            pieces = [p.numel for p in chunk if p.trainable]
        else:
            pieces = []
            for bucket in buckets:
                shard = (bucket.end - bucket.start) // dp
                lo = bucket.start + dp_rank * shard
                hi = lo + shard
                pieces += [min(e, hi) - max(s, lo) for s, e in bucket.params if min(e, hi) > max(s, lo)]
        moments += sum(2 * 4 * n + step for n in pieces)
        master += sum(4 * n for n in pieces) if pbytes != 4 else 0
    return StateBytes(weights, gradients, master, moments)
