"""``ModalityGroupedSampler`` (``model.data.group_by_modality_length``, LLaVA's ``--group_by_modality_length``): every
global batch image-only or text-only across all data-parallel ranks, lengths grouped as LLaVA's
``get_modality_length_grouped_indices`` groups them, the order fixed by the seed and continued exactly on resume."""

from __future__ import annotations

import itertools
import random

import pytest

from neva_tools.errors import NevaError
from neva_tools.train.sampler import ModalityGroupedSampler, balanced_chunks, grouped_epoch_size

MICRO, DP, GLOBAL = 2, 2, 8  # two accumulation steps of two ranks' micro batches of 2


def _data(images: int, texts: int, seed: int = 0) -> tuple[list[bool], list[int]]:
    rng = random.Random(seed)
    modality = [True] * images + [False] * texts
    rng.shuffle(modality)
    return modality, [rng.randint(1, 400) for _ in modality]


def _streams(images: list[bool], lengths: list[int], steps: int, *, consumed: int = 0, seed: int = 3,
             dp: int = DP) -> list[list[int]]:  # fmt: skip
    """Each rank's indices for ``steps`` optimizer steps starting after ``consumed`` samples."""
    per_rank = steps * GLOBAL // dp
    return [list(itertools.islice(ModalityGroupedSampler(images, lengths, micro_batch_size=MICRO,
                                                         global_batch_size=GLOBAL, dp_rank=r, dp_size=dp, seed=seed,
                                                         consumed_samples=consumed), per_rank))
            for r in range(dp)]  # fmt: skip


def _micro_batches(streams: list[list[int]], step: int) -> list[list[int]]:
    """The micro batches of one optimizer step: accumulation step by accumulation step, rank by rank."""
    per_rank = GLOBAL // len(streams)
    mine = [s[step * per_rank : (step + 1) * per_rank] for s in streams]
    return [m[a * MICRO : (a + 1) * MICRO] for a in range(per_rank // MICRO) for m in mine]


def test_every_global_batch_holds_one_modality_on_every_rank() -> None:
    images, lengths = _data(13, 7)
    epoch = grouped_epoch_size(images, GLOBAL)
    assert epoch == 16 + 8  # 13 images → 2 global batches, 7 texts → 1
    steps = 3 * epoch // GLOBAL  # three epochs
    streams = _streams(images, lengths, steps)
    kinds = []
    for step in range(steps):
        batch = [i for micro in _micro_batches(streams, step) for i in micro]
        assert len({images[i] for i in batch}) == 1, (step, batch)
        kinds.append(images[batch[0]])
    assert kinds.count(True) == 2 * 3 and kinds.count(False) == 1 * 3
    for start in range(0, steps, epoch // GLOBAL):  # each epoch covers every sample
        seen = {i for step in range(start, start + epoch // GLOBAL) for m in _micro_batches(streams, step) for i in m}
        assert seen == set(range(len(images)))


def test_ranks_are_disjoint_and_cover_each_epoch() -> None:
    images, lengths = _data(16, 8)  # whole global batches: no sample repeats within an epoch
    streams = _streams(images, lengths, 3)
    assert [sorted(s) for s in streams] != [sorted(streams[0])] * DP
    assert set(streams[0]).isdisjoint(streams[1])
    assert sorted(streams[0] + streams[1]) == list(range(24))
    one = _streams(images, lengths, 3, dp=1)[0]  # the same global batches at DP=1, split differently
    for step in range(3):
        at_dp2 = sorted(i for m in _micro_batches(streams, step) for i in m)
        assert at_dp2 == sorted(one[step * GLOBAL : (step + 1) * GLOBAL])


def test_order_is_fixed_by_the_seed() -> None:
    images, lengths = _data(13, 7)
    assert _streams(images, lengths, 6) == _streams(images, lengths, 6)
    assert _streams(images, lengths, 6) != _streams(images, lengths, 6, seed=4)
    first, second = _streams(images, lengths, 6)[0][:12], _streams(images, lengths, 6)[0][12:24]
    assert first != second  # each epoch is shuffled anew


@pytest.mark.parametrize("steps_done", range(0, 10))
def test_resume_continues_the_uninterrupted_order(steps_done: int) -> None:
    images, lengths = _data(13, 7)
    whole = _streams(images, lengths, 10)
    resumed = _streams(images, lengths, 10 - steps_done, consumed=steps_done * GLOBAL)
    per_rank = GLOBAL // DP
    assert resumed == [s[steps_done * per_rank :] for s in whole]


def test_resume_at_any_sample_count_continues_the_stream() -> None:
    images, lengths = _data(5, 9)
    whole = _streams(images, lengths, 8, dp=1)[0]
    for consumed in range(0, 40):
        sampler = ModalityGroupedSampler(images, lengths, micro_batch_size=MICRO, global_batch_size=GLOBAL, seed=3,
                                         consumed_samples=consumed)  # fmt: skip
        assert list(itertools.islice(sampler, 64 - consumed)) == whole[consumed:]


def test_lengths_are_grouped_as_llava_groups_them() -> None:
    """Within a global batch: longest first, dealt into micro batches of balanced total length (LLaVA's
    ``split_to_even_chunks``); micro batch ``k`` of the step goes to rank ``k % DP``."""
    images, lengths = _data(16, 8, seed=1)
    streams = _streams(images, lengths, 3)
    for step in range(3):
        micros = _micro_batches(streams, step)
        ranked = sorted((i for m in micros for i in m), key=lambda i: -lengths[i])
        assert micros == balanced_chunks(ranked, lengths, GLOBAL // MICRO)
        assert lengths[micros[0][0]] == max(lengths[i] for i in ranked)
        assert all(lengths[m[0]] >= lengths[m[1]] for m in micros)


def _llava_split_to_even_chunks(indices: list[int], lengths: list[int], chunks: int) -> list[list[int]]:
    """LLaVA's ``split_to_even_chunks`` as written there (the reference)."""
    per_chunk = len(indices) // chunks
    out: list[list[int]] = [[] for _ in range(chunks)]
    totals: list[float] = [0] * chunks
    for index in indices:
        shortest = totals.index(min(totals))
        out[shortest].append(index)
        totals[shortest] += lengths[index]
        if len(out[shortest]) == per_chunk:
            totals[shortest] = float("inf")
    return out


@pytest.mark.parametrize("seed", range(5))
def test_balanced_chunks_match_llava(seed: int) -> None:
    rng = random.Random(seed)
    lengths = [rng.choice([1, 5, 5, 20, 300]) for _ in range(48)]  # ties included
    ranked = sorted(range(48), key=lambda i: -lengths[i])
    for chunks in (1, 2, 4, 8, 16, 48):
        assert balanced_chunks(ranked, lengths, chunks) == _llava_split_to_even_chunks(ranked, lengths, chunks)


def test_one_modality_only_and_a_pool_smaller_than_a_batch() -> None:
    images, lengths = [False] * 3, [4, 1, 9]  # text only, 3 samples: each global batch of 8 repeats them
    assert grouped_epoch_size(images, GLOBAL) == GLOBAL
    (stream,) = _streams(images, lengths, 2, dp=1)
    assert set(stream) == {0, 1, 2} and len(stream) == 16


def test_batch_sizes_must_divide() -> None:
    with pytest.raises(NevaError, match=r"model.global_batch_size \(6\) must be a multiple of model.micro_batch_size "
                                        r"\(2\) × data-parallel size \(2\)"):  # fmt: skip
        ModalityGroupedSampler([True] * 4, [1] * 4, micro_batch_size=2, global_batch_size=6, dp_size=2)
