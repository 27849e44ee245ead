"""Packing: first-fit-decreasing fill, no sample crosses a bin, boundaries and masks."""

from __future__ import annotations

import random

import pytest
import torch

from neva_tools.data.packing import first_fit_decreasing, pack_sequences, packed_attention_mask
from neva_tools.errors import NevaError


def test_lognormal_lengths_fill_at_least_97_percent() -> None:
    rng = random.Random(0)
    lengths = [min(4096, max(16, int(rng.lognormvariate(6.0, 0.7)))) for _ in range(5000)]
    result = first_fit_decreasing(lengths, 4096)
    placed = sorted(i for b in result.bins for i in b)
    assert placed == list(range(len(lengths)))  # every sample exactly once
    assert all(sum(lengths[i] for i in b) <= 4096 for b in result.bins)
    assert result.fill_ratio >= 0.97
    lower_bound = -(-sum(lengths) // 4096)
    assert len(result.bins) <= lower_bound + 2


def test_overlong_sample_is_an_error_or_truncated() -> None:
    with pytest.raises(NevaError, match="rec-7 has 5000 tokens after image expansion, more than max_seq_length 4096"):
        first_fit_decreasing([10, 5000], 4096, names=["a", "rec-7"])
    result = first_fit_decreasing([10, 5000], 4096, truncate=True)
    assert result.truncated == [1] and result.lengths == [10, 4096]


def test_packed_sequence_boundaries_and_mask() -> None:
    a = (torch.tensor([1, 2, 3]), torch.tensor([2, 3, -100]))
    b = (torch.tensor([7, 8]), torch.tensor([8, -100]))
    packed = pack_sequences([a, b])
    assert packed.input_ids.tolist() == [1, 2, 3, 7, 8]
    assert packed.labels.tolist() == [2, 3, -100, 8, -100]  # no label points into the next sample
    assert packed.position_ids.tolist() == [0, 1, 2, 0, 1]
    assert packed.cu_seqlens.tolist() == [0, 3, 5]
    mask = packed_attention_mask(packed.input_ids[None], [packed.cu_seqlens])[0, 0]
    allowed = (~mask).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ]


def test_packed_mask_is_built_in_the_image_expanded_space() -> None:
    """Row 0: sample [5, <image>] then sample [6]; row 1 unpacked [<image>, 7] + one pad; an image = 3 embeddings."""
    image = -200
    ids = torch.tensor([[5, image, 6], [image, 7, 0]])
    mask = packed_attention_mask(ids, [torch.tensor([0, 2, 3]), None], image_tokens=3, image_token_index=image)
    assert mask.shape == (2, 1, 5, 5)
    allowed = (~mask[:, 0]).int().tolist()
    assert allowed[0] == [  # segments 0 0 0 0 | 1
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [0, 0, 0, 0, 1],
    ]
    assert allowed[1] == [  # one sample of 3 + 1 (row has no cu_seqlens: all one segment, pad included)
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
    ]
    assert bool((~mask).any(dim=-1).all())  # no fully masked query row


def test_packed_mask_is_built_on_the_inputs_device() -> None:
    """Every tensor of the mask is made on ``input_ids``'s device (on a GPU: no dense mask built on the host)."""
    image = -200
    ids = torch.tensor([[5, image, 6], [image, 7, 0]])
    cu = [torch.tensor([0, 2, 3]), None]
    expected = packed_attention_mask(ids, cu, image_tokens=3, image_token_index=image)
    with torch.device("meta"):  # a tensor made on the default device would be a meta tensor and fail below
        mask = packed_attention_mask(ids, cu, image_tokens=3, image_token_index=image)
    assert mask.device == ids.device and torch.equal(mask, expected)
