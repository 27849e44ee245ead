"""Tensor-parallel split and merge rules, written once for every split kind of the mapping tables."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from neva_tools.errors import NevaError
from neva_tools.mappings.base import Split


def check_divisible(tp: int, **counts: int) -> None:
    """Raise unless ``tp`` divides every count, naming both numbers (e.g. ``num_query_groups=2``)."""
    for name, count in counts.items():
        if count % tp:
            raise NevaError(f"tensor_model_parallel_size ({tp}) must divide {name} ({count})")


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Append zero rows so that dim 0 has ``rows`` entries (vocabulary padding)."""
    if tensor.shape[0] > rows:
        raise NevaError(f"cannot pad {tensor.shape[0]} vocabulary rows down to {rows}")
    if tensor.shape[0] == rows:
        return tensor
    pad = tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))
    return torch.cat([tensor, pad], dim=0)


def shard(
    tensor: torch.Tensor, split: Split, tp: int, rank: int, *, padded_vocab: int | None = None, compact: bool = True
) -> torch.Tensor:
    """The part of a full (TP=1) tensor that tensor-parallel ``rank`` of ``tp`` holds.

    A split part is a compact copy, never a view: ``torch.save`` writes a view's whole storage. With
    ``compact=False`` a part that is a slice of ``tensor`` comes back as a view (for writing its bytes out).
    """
    keep = _compact if compact else (lambda part: part)
    if split is Split.VOCAB:
        if padded_vocab is None:
            raise ValueError("padded_vocab is required for vocab-parallel tensors")
        return keep(torch.chunk(pad_rows(tensor, padded_vocab), tp, dim=0)[rank])
    if split is Split.REPLICATED or tp == 1 or (split is Split.ROW and tensor.dim() == 1):
        return tensor.contiguous()  # row-parallel biases are replicated
    if split in (Split.COLUMN, Split.QKV):
        return keep(_chunk(tensor, tp, 0)[rank])
    if split is Split.ROW:
        return keep(_chunk(tensor, tp, 1)[rank])
    if split is Split.GATED_MLP:
        gate, up = torch.chunk(tensor, 2, dim=0)
        return torch.cat([_chunk(gate, tp, 0)[rank], _chunk(up, tp, 0)[rank]], dim=0)
    raise ValueError(f"unknown split kind {split}")


def shard_shape(shape: Sequence[int], split: Split, tp: int, *, padded_vocab: int | None = None) -> tuple[int, ...]:
    """The shape of every rank's part of a full tensor of ``shape`` (what ``shard`` returns), without data."""
    shape = tuple(shape)
    if split is Split.VOCAB:
        if padded_vocab is None:
            raise ValueError("padded_vocab is required for vocab-parallel tensors")
        if shape[0] > padded_vocab:
            raise NevaError(f"cannot pad {shape[0]} vocabulary rows down to {padded_vocab}")
        if padded_vocab % tp:
            raise ValueError(f"padded vocabulary {padded_vocab} is not a multiple of TP={tp}")
        return (padded_vocab // tp, *shape[1:])
    if split is Split.REPLICATED or tp == 1 or (split is Split.ROW and len(shape) == 1):
        return shape
    dim = 1 if split is Split.ROW else 0
    if shape[dim] % (2 * tp if split is Split.GATED_MLP else tp):
        raise NevaError(f"dimension {dim} of size {shape[dim]} cannot be split evenly across TP={tp}")
    return tuple(n // tp if d == dim else n for d, n in enumerate(shape))


def _compact(part: torch.Tensor) -> torch.Tensor:
    """``part`` with a storage of its own size (a view of a larger tensor is copied)."""
    if part.is_contiguous() and part.untyped_storage().nbytes() == part.numel() * part.element_size():
        return part
    return part.clone(memory_format=torch.contiguous_format)


def _chunk(tensor: torch.Tensor, tp: int, dim: int) -> tuple[torch.Tensor, ...]:
    if tensor.shape[dim] % tp:
        raise NevaError(f"dimension {dim} of size {tensor.shape[dim]} cannot be split evenly across TP={tp}")
    return torch.chunk(tensor, tp, dim=dim)


def merge(shards: Sequence[torch.Tensor], split: Split, *, name: str, vocab: int | None = None) -> torch.Tensor:
    """Rebuild the full tensor from every rank's shard (inverse of ``shard``).

    Replicated tensors must be identical on every rank; a mismatch names the tensor and the ranks.
    For vocab-parallel tensors the padding is removed again when ``vocab`` is given.
    """
    if len(shards) == 1 and split is not Split.VOCAB:
        return shards[0]
    if split is Split.REPLICATED or (split is Split.ROW and shards[0].dim() == 1):
        for rank, other in enumerate(shards[1:], start=1):
            if other.shape != shards[0].shape or not torch.equal(other, shards[0]):
                raise NevaError(f"replicated tensor {name} differs between TP rank 0 and TP rank {rank}")
        return shards[0]
    if split in (Split.COLUMN, Split.QKV, Split.VOCAB):
        full = torch.cat(list(shards), dim=0)
        return full[:vocab] if split is Split.VOCAB and vocab is not None else full
    if split is Split.ROW:
        return torch.cat(list(shards), dim=1)
    if split is Split.GATED_MLP:
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])], dim=0)
    raise ValueError(f"unknown split kind {split}")
