"""Tensor-parallel parts as byte ranges of stored tensors, found by running the split rules on row numbers.

A part of a dim-0 split (column, fused QKV, gate/up, vocabulary) is a sequence of whole rows of the
full tensor, and each row of the full tensor is a row of one stored tensor (an HF tensor fused into
QKV, one rank's shard of a ``.nemo``). Instead of re-deriving those layouts, ``part_runs`` runs the
very functions that build and split the values (``mappings.transforms``, ``checkpoint.tp``) on tensors
of row numbers and reads the answer off: runs of consecutive rows of one stored tensor, and padding.
Those runs are then copied file to file, without reading the values into memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from neva_tools.checkpoint import tp as tp_rules
from neva_tools.mappings.base import Split

PADDING = -1  # source index of vocabulary padding rows (zeros)


@dataclass(frozen=True)
class Stored:
    """A stored tensor: where its bytes lie on disk (file, offset; None when unknown), its shape and dtype."""

    where: tuple[str, int] | None
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def row_bytes(self) -> int:
        """Bytes of one dim-0 row (one element for a 1-D tensor)."""
        return math.prod(self.shape[1:]) * self.dtype.itemsize


def copyable(split: Split, sources: Sequence[Stored], dtype: torch.dtype, tp: int) -> bool:
    """True when every part of the full tensor can be copied as rows of ``sources`` (``part_runs``).

    Not when a source's bytes are not on disk or need a dtype conversion; not for row-parallel weights
    (dim-1 splits) unless the part is the whole stored tensor; not for replicated tensors stored on
    several ranks (their copies must be compared).
    """
    if not sources or any(s.where is None or s.dtype != dtype for s in sources):
        return False
    ndim = len(sources[0].shape)
    if split is Split.REPLICATED or (split is Split.ROW and ndim == 1):
        return len(sources) == 1
    if split is Split.ROW:
        return len(sources) == 1 and tp == 1
    return True


def part_runs(
    sources: Sequence[Stored], assemble: Callable[[list[torch.Tensor]], torch.Tensor], split: Split, tp: int,
    rank: int, padded_vocab: int | None,
) -> list[tuple[int, int, int]]:  # fmt: skip
    """TP ``rank``'s part of the full tensor as runs (source index or ``PADDING``, first row, rows).

    ``assemble`` builds the full tensor from the source tensors (fusing or merging) and is run here on
    row numbers; only valid where ``copyable`` holds.
    """
    counts = [s.shape[0] for s in sources]
    bases = np.cumsum([0, *counts])
    rows = [torch.arange(base + 1, base + 1 + n, device="cpu") for base, n in zip(bases.tolist(), counts, strict=False)]
    ids = tp_rules.shard(assemble(rows), split, tp, rank, padded_vocab=padded_vocab).numpy() - 1  # -1: padding
    source = np.where(ids >= 0, np.searchsorted(bases[1:], ids, side="right"), PADDING)
    row = np.where(source == PADDING, 0, ids - bases[source.clip(min=0)])
    new = np.ones(len(ids), dtype=bool)
    new[1:] = (source[1:] != source[:-1]) | ((source[1:] != PADDING) & (row[1:] != row[:-1] + 1))
    starts = np.flatnonzero(new)
    lengths = np.diff(np.append(starts, len(ids)))
    return list(zip(source[starts].tolist(), row[starts].tolist(), lengths.tolist(), strict=True))
