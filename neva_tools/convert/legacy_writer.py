"""Streaming the legacy weights (``model_weights.ckpt`` per rank) of a ``.nemo``: lay out, then fill in.

Every rank's ``torch.save`` file is first written with its tensor bytes left as holes
(``NemoWriter.add_torch_skeleton``); then each full tensor is visited once and its parts are written
into every rank's file by offset. Parts that are rows of stored tensors with the output dtype are
copied file to file (``checkpoint.parts``, ``checkpoint.fill``); the others are built in memory from
the full tensor, which is read once for all ranks. Memory holds at most one full tensor and one part.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from neva_tools.checkpoint import tp as tp_rules
from neva_tools.checkpoint.fill import RangeWriter
from neva_tools.checkpoint.nemo_writer import NemoWriter
from neva_tools.checkpoint.parts import PADDING, Stored, copyable, part_runs
from neva_tools.mappings.base import Split


@dataclass
class Job:
    """One full (TP=1) tensor of the output and the rank files its parts go to.

    ``shape`` is the full tensor's; ``assemble`` builds it from tensors shaped like ``sources`` (fusing HF
    tensors or merging TP shards); ``load`` returns the full tensor read and converted to ``dtype``.
    ``targets`` holds (member, stored key, TP rank) for every rank file that keeps a part.
    """

    name: str
    split: Split
    shape: tuple[int, ...]
    dtype: torch.dtype
    sources: Sequence[Stored]
    assemble: Callable[[list[torch.Tensor]], torch.Tensor]
    load: Callable[[], torch.Tensor]
    targets: list[tuple[str, str, int]] = field(default_factory=list)


def part_bytes(jobs: Sequence[Job], tp: int, padded_vocab: int) -> int:
    """Bytes ``write_legacy`` writes for ``jobs`` (every part, vocabulary padding included)."""
    sizes = (math.prod(tp_rules.shard_shape(j.shape, j.split, tp, padded_vocab=padded_vocab)) for j in jobs)
    return sum(n * job.dtype.itemsize * len(job.targets) for n, job in zip(sizes, jobs, strict=True))


def write_legacy(writer: NemoWriter, jobs: Sequence[Job], tp: int, padded_vocab: int, bar: Any) -> int:
    """Write every job's parts into their rank files (in member order of first appearance); return bytes written.

    ``bar`` is a progress bar advanced by the bytes written.
    """
    specs: dict[str, dict[str, tuple[tuple[int, ...], torch.dtype]]] = {}
    for job in jobs:
        shape = tp_rules.shard_shape(job.shape, job.split, tp, padded_vocab=padded_vocab)
        for member, key, _ in job.targets:
            specs.setdefault(member, {})[key] = (shape, job.dtype)
    offsets = {member: writer.add_torch_skeleton(member, tensors) for member, tensors in specs.items()}
    with RangeWriter(writer.fileno()) as out, _one_thread():
        for job in jobs:
            before = out.written
            if copyable(job.split, job.sources, job.dtype, tp):
                for member, key, rank in job.targets:
                    _copy_part(out, job, tp, rank, padded_vocab, offsets[member][key])
            else:
                full = job.load()  # read once for all ranks
                for member, key, rank in job.targets:
                    shard = functools.partial(tp_rules.shard, padded_vocab=padded_vocab, compact=False)
                    out.write(shard(full, job.split, tp, rank), offsets[member][key])  # a view: no copy kept
                del full
            bar.update(out.written - before)
        return out.written


def _copy_part(out: RangeWriter, job: Job, tp: int, rank: int, padded_vocab: int, offset: int) -> None:
    """Copy one part's rows from the source files (zeros for vocabulary padding) to ``offset``."""
    row_bytes = job.sources[0].row_bytes
    for source, row, rows in part_runs(job.sources, job.assemble, job.split, tp, rank, padded_vocab):
        nbytes = rows * row_bytes
        if source == PADDING:
            out.zeros(nbytes, offset)
        else:
            where = job.sources[source].where
            assert where is not None
            out.copy(where[0], where[1] + row * row_bytes, nbytes, offset)
        offset += nbytes


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch ops on one thread: the copies here are memory-bound, and waking OpenMP workers on a busy
    machine cost up to 15× the copy itself (measured: a column split of a 2048×5632 bf16 matrix)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
