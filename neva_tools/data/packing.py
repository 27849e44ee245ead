"""Sequence packing: first-fit-decreasing of samples into bins of ``max_seq_length`` tokens.

Lengths are counted after image expansion. A sample longer than a bin is an error naming it, or is
truncated when asked; it is never dropped. Packed sequences keep per-sample boundaries: position ids
restart at every sample and ``cu_seqlens`` marks where each one starts, so attention (with a
block-diagonal mask or varlen kernels) and the loss never cross samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from neva_tools.errors import NevaError


@dataclass(frozen=True)
class PackResult:
    """Bins (lists of sample indices, longest first) and how full they are."""

    bins: list[list[int]]
    lengths: list[int]
    capacity: int
    truncated: list[int]

    @property
    def fill_ratio(self) -> float:
        """Tokens placed / (bins × capacity)."""
        return sum(self.lengths) / max(1, len(self.bins) * self.capacity)


class _MaxTree:
    """Remaining capacity per bin in a max segment tree: leftmost bin with room ≥ L in O(log n)."""

    def __init__(self, size: int) -> None:
        self.n = 1
        while self.n < size:
            self.n *= 2
        self.tree = [0] * (2 * self.n)

    def set(self, i: int, value: int) -> None:
        i += self.n
        self.tree[i] = value
        while i > 1:
            i //= 2
            self.tree[i] = max(self.tree[2 * i], self.tree[2 * i + 1])

    def leftmost(self, need: int) -> int | None:
        if self.tree[1] < need:
            return None
        i = 1
        while i < self.n:
            i = 2 * i if self.tree[2 * i] >= need else 2 * i + 1
        return i - self.n


def first_fit_decreasing(
    lengths: Sequence[int], capacity: int, *, truncate: bool = False, names: Sequence[str] | None = None
) -> PackResult:
    """Pack samples of ``lengths`` into as few bins of ``capacity`` as first-fit-decreasing finds."""
    if capacity < 1:
        raise NevaError(f"max_seq_length ({capacity}) must be positive")
    fitted, truncated = list(lengths), []
    for i, n in enumerate(fitted):
        if n > capacity:
            if not truncate:
                label = names[i] if names else f"sample {i}"
                raise NevaError(
                    f"{label} has {n} tokens after image expansion, more than max_seq_length {capacity}; "
                    "raise max_seq_length, shorten the sample, or allow truncation"
                )
            fitted[i] = capacity
            truncated.append(i)
    order = sorted(range(len(fitted)), key=lambda i: (-fitted[i], i))
    tree = _MaxTree(max(1, len(fitted)))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        b = tree.leftmost(fitted[i])
        if b is None:
            b = len(bins)
            bins.append([])
            room.append(capacity)
        bins[b].append(i)
        room[b] -= fitted[i]
        tree.set(b, room[b])
    return PackResult(bins, fitted, capacity, truncated)


@dataclass
class PackedSequence:
    """One packed bin: concatenated ids/labels, per-sample position ids and boundaries."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor  # int32, [num_samples + 1]: start offsets, then the total length


def pack_sequences(samples: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> PackedSequence:
    """Concatenate (input_ids, labels) pairs that were already shifted per sample; positions restart."""
    ids = torch.cat([s[0] for s in samples])
    labels = torch.cat([s[1] for s in samples])
    lengths = torch.tensor([len(s[0]) for s in samples], dtype=torch.int32)
    cu = torch.zeros(len(samples) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    positions = torch.cat([torch.arange(int(n)) for n in lengths])
    return PackedSequence(ids, labels, positions, cu)


def packed_attention_mask(input_ids: torch.Tensor, cu_seqlens: Sequence[torch.Tensor | None],
                          image_tokens: int | torch.Tensor = 1,
                          image_token_index: int | None = None) -> torch.Tensor:  # fmt: skip
    """Block-diagonal causal mask ``[b, 1, S, S]`` (True = masked, megatron's convention) for packed rows.

    ``input_ids`` ``[b, s]`` hold one ``image_token_index`` per image, which ``LLaVAModel`` expands to
    ``image_tokens`` embeddings (one count for all, or each image's in row-major order, as the batch's
    ``image_tokens``); the mask is built in that expanded space (``S`` = the longest expanded row), so
    each sample attends only to itself. ``cu_seqlens[r]`` gives row ``r``'s sample starts and total in text
    tokens (``None``: the row is one sample). Padding after the samples forms a segment of its own, so no query
    row is fully masked (fused attention kernels return NaN for those).

    Built on ``input_ids``'s device with one host synchronisation (the expanded length ``S``).
    """
    rows, s = input_ids.shape
    device = input_ids.device
    widths = torch.ones_like(input_ids)
    if image_token_index is not None:
        is_image = input_ids == image_token_index
        if isinstance(image_tokens, torch.Tensor):
            widths[is_image] = image_tokens.to(device=device, dtype=widths.dtype)
        else:
            widths = torch.where(is_image, image_tokens, widths)
    ends = widths.cumsum(1)  # [b, s]: expanded end of each text position
    total = int(ends[:, -1].max())  # the one host synchronisation: the mask's size
    text = torch.arange(s, device=device)
    segments = torch.empty(rows, s + 1, dtype=torch.long, device=device)  # last column: beyond the row
    for r in range(rows):
        cu = cu_seqlens[r] if cu_seqlens[r] is not None else torch.tensor([0, s], device=device)
        cu = cu.to(device=device, dtype=torch.long)
        segments[r, :s] = torch.searchsorted(cu[1:], text, right=True)  # k on [cu[k], cu[k+1]); padding: last
        segments[r, s] = len(cu) - 1
    expanded = torch.arange(total, device=device).expand(rows, total).contiguous()
    source = torch.searchsorted(ends, expanded, right=True)  # the text position of each expanded position
    segments = segments.gather(1, source)
    same = segments[:, :, None] == segments[:, None, :]
    causal = torch.ones(total, total, dtype=torch.bool, device=device).tril()
    return ~(same & causal)[:, None]
