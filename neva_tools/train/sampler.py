"""A resumable data-parallel sampler: an endless, seeded index stream split by data-parallel rank.

Resuming at consumed sample ``c`` continues the exact sequence an uninterrupted run would have seen,
so a resumed run follows the same loss curve. Each epoch is a fresh permutation (seed + epoch) when
shuffling; ranks take interleaved slices of every global batch.

``ModalityGroupedSampler`` (``model.data.group_by_modality_length``, LLaVA's ``--group_by_modality_length``) orders
each epoch as LLaVA's ``get_modality_length_grouped_indices`` does: image and text-only samples are drawn from
separate pools, each pool shuffled and cut into megabatches of one global batch, each megabatch sorted by length
(longest first) and split into micro batches of balanced total length, and the megabatches of both pools shuffled
together. Unlike LLaVA, whose last partial megabatches of the two pools form one mixed batch, a pool's last partial
megabatch is filled up with the first samples of that pool's shuffled order, so that every global batch holds one
modality; an epoch is then a whole number of global batches (a few samples seen twice).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from neva_tools.errors import NevaError


class ResumableSampler(Sampler[int]):
    """Indices for one data-parallel rank, starting after ``consumed_samples`` global samples."""

    def __init__(self, size: int, *, dp_rank: int = 0, dp_size: int = 1, seed: int = 1234, shuffle: bool = True,
                 consumed_samples: int = 0) -> None:  # fmt: skip
        if size < 1:
            raise ValueError("the dataset is empty")
        self.size, self.dp_rank, self.dp_size = size, dp_rank, dp_size
        self.seed, self.shuffle, self.consumed_samples = seed, shuffle, consumed_samples
        self.epoch_size = size  # global sample positions per epoch (the length of one ``_order``)

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def __iter__(self) -> Iterator[int]:
        position = self.consumed_samples + self.dp_rank  # global sample position this rank reads next
        cached, order = -1, []
        while True:
            epoch, offset = divmod(position, self.epoch_size)
            if epoch != cached:
                cached, order = epoch, self._order(epoch)
            yield order[offset]
            position += self.dp_size

    def __len__(self) -> int:
        return 2**62  # endless: training length is trainer.max_steps


def grouped_epoch_size(images: Sequence[bool], global_batch_size: int) -> int:
    """Global sample positions per epoch of :class:`ModalityGroupedSampler`: each modality's pool rounded up to whole
    global batches."""
    pools = (sum(1 for i in images if i), sum(1 for i in images if not i))
    return sum(-(-n // global_batch_size) * global_batch_size for n in pools)


def balanced_chunks(indices: Sequence[int], lengths: Sequence[int], chunks: int) -> list[list[int]]:
    """``indices`` (longest first) dealt into ``chunks`` equal-sized chunks, each index to the chunk of least total
    length that is not yet full (lowest chunk on ties): LLaVA's ``split_to_even_chunks``."""
    size = len(indices) // chunks
    out: list[list[int]] = [[] for _ in range(chunks)]
    heap = [(0, c) for c in range(chunks)]
    for index in indices:
        total, c = heapq.heappop(heap)
        out[c].append(index)
        if len(out[c]) < size:
            heapq.heappush(heap, (total + lengths[index], c))
    return out


class ModalityGroupedSampler(ResumableSampler):
    """Indices for one data-parallel rank where every global batch is image-only or text-only, grouped by length.

    ``images[i]``: sample ``i`` has an image; ``lengths[i]``: its length (LLaVA counts the words of all turns). An
    epoch's order (:meth:`_order`, seeded by ``seed + epoch``) is laid out so that rank ``r``'s ``k``-th micro batch
    of a step is chunk ``k × dp_size + r`` of that step's megabatch, as Hugging Face deals LLaVA's batches to ranks.
    """

    def __init__(self, images: Sequence[bool], lengths: Sequence[int], *, micro_batch_size: int,
                 global_batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 1234,
                 consumed_samples: int = 0) -> None:  # fmt: skip
        if len(images) != len(lengths):
            raise ValueError(f"{len(images)} modalities but {len(lengths)} lengths")
        if global_batch_size % (micro_batch_size * dp_size):
            raise NevaError(f"model.global_batch_size ({global_batch_size}) must be a multiple of model."
                            f"micro_batch_size ({micro_batch_size}) × data-parallel size ({dp_size})")  # fmt: skip
        super().__init__(len(images), dp_rank=dp_rank, dp_size=dp_size, seed=seed, consumed_samples=consumed_samples)
        self.images, self.lengths = [bool(i) for i in images], [int(n) for n in lengths]
        self.micro_batch_size, self.global_batch_size = micro_batch_size, global_batch_size
        self.epoch_size = grouped_epoch_size(self.images, global_batch_size)

    def _megabatches(self, pool: list[int], generator: torch.Generator) -> list[list[int]]:
        """The pool shuffled, filled up to whole global batches from its own start, cut into global batches."""
        if not pool:
            return []
        order = [pool[i] for i in torch.randperm(len(pool), generator=generator).tolist()]
        gbs = self.global_batch_size
        order += [order[i % len(order)] for i in range(-len(order) % gbs)]
        return [order[i : i + gbs] for i in range(0, len(order), gbs)]

    def _layout(self, megabatch: list[int]) -> list[int]:
        """One global batch in position order: sorted longest first, split into balanced micro batches, each micro
        batch placed where its rank reads it (positions ``rank + dp_size × (accumulation step × micro + j)``)."""
        mbs, dp = self.micro_batch_size, self.dp_size
        ranked = sorted(megabatch, key=lambda i: -self.lengths[i])
        out = [0] * len(megabatch)
        for k, chunk in enumerate(balanced_chunks(ranked, self.lengths, len(megabatch) // mbs)):
            step, rank = divmod(k, dp)
            for j, index in enumerate(chunk):
                out[rank + dp * (step * mbs + j)] = index
        return out

    def _order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        image_pool = [i for i, image in enumerate(self.images) if image]
        text_pool = [i for i, image in enumerate(self.images) if not image]
        megabatches = self._megabatches(image_pool, generator) + self._megabatches(text_pool, generator)
        shuffled = torch.randperm(len(megabatches), generator=generator).tolist()
        return [i for m in shuffled for i in self._layout(megabatches[m])]
