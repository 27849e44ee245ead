"""TP split/merge rules: each kind round-trips, and every shard owns a compact storage."""

from __future__ import annotations

import pytest
import torch
from builders import split_cases

from neva_tools.checkpoint.tp import merge, shard, shard_shape
from neva_tools.errors import NevaError
from neva_tools.mappings.base import Split

CASES = split_cases()


@pytest.mark.parametrize(("split", "shape"), CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_split_merge_round_trip_and_compact_storage(split: Split, shape: tuple[int, ...], tp: int) -> None:
    full = torch.randn(shape)
    padded = 16 if split is Split.VOCAB else None
    parts = [shard(full, split, tp, r, padded_vocab=padded) for r in range(tp)]
    for part in parts:
        if split is not Split.REPLICATED and not (split is Split.ROW and full.dim() == 1) and tp > 1:
            assert part.untyped_storage().nbytes() == part.numel() * part.element_size()
    back = merge(parts, split, name="t", vocab=10 if split is Split.VOCAB else None)
    assert torch.equal(back, full)


@pytest.mark.parametrize(("split", "shape"), CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_shard_shape_is_the_shape_of_every_shard(split: Split, shape: tuple[int, ...], tp: int) -> None:
    padded = 16 if split is Split.VOCAB else None
    shapes = {tuple(shard(torch.zeros(shape), split, tp, r, padded_vocab=padded).shape) for r in range(tp)}
    assert shapes == {shard_shape(shape, split, tp, padded_vocab=padded)}


def test_gated_mlp_rank_holds_its_gate_and_up_rows() -> None:
    gate, up = torch.arange(8.0).reshape(4, 2), 100 + torch.arange(8.0).reshape(4, 2)
    part = shard(torch.cat([gate, up]), Split.GATED_MLP, 2, 1)
    assert torch.equal(part, torch.cat([gate[2:], up[2:]]))


def test_vocab_padding_rows_are_zero() -> None:
    parts = [shard(torch.ones(10, 2), Split.VOCAB, 2, r, padded_vocab=16) for r in range(2)]
    assert parts[0].sum() == 16 and parts[1].sum() == 4 and parts[1].shape == (8, 2)


def test_replicated_mismatch_names_tensor_and_ranks() -> None:
    with pytest.raises(NevaError, match="replicated tensor norm differs between TP rank 0 and TP rank 2"):
        merge([torch.ones(3), torch.ones(3), torch.zeros(3)], Split.REPLICATED, name="norm")


def test_uneven_split_is_an_error() -> None:
    with pytest.raises(NevaError, match="cannot be split evenly across TP=4"):
        shard(torch.ones(6, 2), Split.COLUMN, 4, 0)
    with pytest.raises(NevaError, match="dimension 1 of size 6 cannot be split evenly across TP=4"):
        shard_shape((2, 6), Split.ROW, 4)
