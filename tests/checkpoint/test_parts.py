"""Parts as row runs of stored tensors: the traced runs rebuild exactly what the split rules produce."""

from __future__ import annotations

import functools

import pytest
import torch
from builders import split_cases

from neva_tools.checkpoint.parts import PADDING, Stored, copyable, part_runs
from neva_tools.checkpoint.tp import merge, shard
from neva_tools.mappings import transforms
from neva_tools.mappings.base import Split

CASES = split_cases()


def _rebuild(runs: list[tuple[int, int, int]], sources: list[torch.Tensor]) -> torch.Tensor:
    """A part made of the rows the runs name (zeros for padding)."""
    rest = sources[0].shape[1:]
    pieces = [torch.zeros((n, *rest)) if s == PADDING else sources[s][r : r + n] for s, r, n in runs]
    return torch.cat(pieces)


def _stored(tensors: list[torch.Tensor]) -> list[Stored]:
    return [Stored(("file", 0), tuple(t.shape), t.dtype) for t in tensors]


@pytest.mark.parametrize(("split", "shape"), CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("src_tp", [1, 2])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_runs_rebuild_every_part_from_merged_shards(split: Split, shape: tuple[int, ...], src_tp: int, tp: int) -> None:
    full = torch.randn(shape)
    vocab = 10 if split is Split.VOCAB else None
    sources = [shard(full, split, src_tp, r, padded_vocab=16) for r in range(src_tp)]
    stored = _stored(sources)
    replicated = split is Split.REPLICATED or (split is Split.ROW and len(shape) == 1)
    row_split = split is Split.ROW and len(shape) == 2
    expected = src_tp == 1 if replicated else (src_tp == 1 and tp == 1) if row_split else True
    assert copyable(split, stored, torch.float32, tp) == expected
    if not expected:  # column slices and replicated copies on several ranks go through memory
        return
    assemble = functools.partial(merge, split=split, name="t", vocab=vocab)
    for rank in range(tp):
        runs = part_runs(stored, assemble, split, tp, rank, padded_vocab=32)
        want = shard(full, split, tp, rank, padded_vocab=32)
        assert torch.equal(_rebuild(runs, sources), want)
        assert all(n > 0 for _, _, n in runs)


@pytest.mark.parametrize(("heads", "groups"), [(8, 2), (4, 4)])
@pytest.mark.parametrize("tp", [1, 2])
def test_runs_of_fused_qkv_and_gated_mlp_from_hf_tensors(heads: int, groups: int, tp: int) -> None:
    d, hidden = 4, 6
    q, k, v = torch.randn(heads * d, hidden), torch.randn(groups * d, hidden), torch.randn(groups * d, hidden)
    qkv = functools.partial(transforms.fuse_qkv, num_heads=heads, num_groups=groups)
    gated = lambda parts: transforms.fuse_gated(*parts)  # noqa: E731
    for split, parts, assemble in [(Split.QKV, [q, k, v], lambda p: qkv(*p)), (Split.GATED_MLP, [q, q + 1], gated)]:
        full = assemble(parts)
        for rank in range(tp):
            runs = part_runs(_stored(parts), assemble, split, tp, rank, padded_vocab=None)
            assert torch.equal(_rebuild(runs, parts), shard(full, split, tp, rank))
    # a rank's QKV part is whole row blocks: q of its groups, then k_g, v_g, per group
    runs = part_runs(_stored([q, k, v]), lambda p: qkv(*p), Split.QKV, 1, 0, padded_vocab=None)
    assert runs[:3] == [(0, 0, heads // groups * d), (1, 0, d), (2, 0, d)]


def test_consecutive_rows_of_one_source_are_one_run() -> None:
    emb = torch.randn(10, 4)
    runs = part_runs(_stored([emb]), lambda p: p[0], Split.VOCAB, 2, 1, padded_vocab=16)
    assert runs == [(0, 8, 2), (PADDING, 0, 6)]
    runs = part_runs(_stored([emb]), lambda p: p[0], Split.VOCAB, 1, 0, padded_vocab=16)
    assert runs == [(0, 0, 10), (PADDING, 0, 6)]


def test_not_copyable_without_location_or_with_another_dtype() -> None:
    t = torch.zeros(4, 4)
    assert copyable(Split.COLUMN, _stored([t]), torch.float32, 2)
    assert not copyable(Split.COLUMN, _stored([t]), torch.bfloat16, 2)
    assert not copyable(Split.COLUMN, [Stored(None, (4, 4), torch.float32)], torch.float32, 2)
    assert copyable(Split.ROW, _stored([t]), torch.float32, 1)  # the whole matrix
    assert not copyable(Split.ROW, _stored([t]), torch.float32, 2)  # column slices
    assert not copyable(Split.REPLICATED, _stored([t[0], t[0]]), torch.float32, 1)  # copies must be compared
