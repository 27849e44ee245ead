"""A resumable data-parallel sampler: an endless, seeded index stream split by data-parallel rank.

Resuming at consumed sample ``c`` continues the exact sequence an uninterrupted run would have seen,
so a resumed run follows the same loss curve. Each epoch is a fresh permutation (seed + epoch) when
shuffling; ranks take interleaved slices of every global batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Indices for one data-parallel rank, starting after ``consumed_samples`` global samples."""

    def __init__(self, size: int, *, dp_rank: int = 0, dp_size: int = 1, seed: int = 1234, shuffle: bool = True,
                 consumed_samples: int = 0) -> None:  # fmt: skip
        if size < 1:
            raise ValueError("the dataset is empty")
        self.size, self.dp_rank, self.dp_size = size, dp_rank, dp_size
        self.seed, self.shuffle, self.consumed_samples = seed, shuffle, consumed_samples

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def __iter__(self) -> Iterator[int]:
        position = self.consumed_samples + self.dp_rank  # global sample position this rank reads next
        while True:
            epoch, offset = divmod(position, self.size)
            yield self._order(epoch)[offset]
            position += self.dp_size

    def __len__(self) -> int:
        return 2**62  # endless: training length is trainer.max_steps
