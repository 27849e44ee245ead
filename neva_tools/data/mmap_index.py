"""Reading and checking a megatron-core mmap ``.idx`` against its ``.bin`` without megatron's reader.

:func:`read_index` maps the index's arrays as megatron-core's ``_IndexReader`` lays them out (header, version,
dtype code, the two counts; a file whose size does not match its counts is an error, multimodal indexes' mode
bytes allowed); :func:`check_index` checks that documents cover the sequences in order, that each sequence starts
where the previous one ends, and that the ``.bin`` is exactly as long as they are, in chunks of bounded memory.
Every failure is a ``NevaError`` naming the file, the sizes found and how to rebuild the pair.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neva_tools.errors import NevaError

_INDEX_MAGIC = b"MMIDIDX\x00\x00"  # megatron-core's _INDEX_HEADER, then version 1, dtype code, two counts
_INDEX_HEADER_SIZE = 34
_CHECK_CHUNK = 1 << 22  #: sequences checked at a time (bounded memory on datasets of 10⁸ sequences)
_AGAIN = "run neva data preprocess again to rebuild the pair"


@dataclass(frozen=True)
class MmapIndex:
    """The arrays of a megatron-core ``.idx`` (memory-mapped), as its ``_IndexReader`` reads them."""

    dtype: np.dtype
    sequence_count: int
    sequence_lengths: np.ndarray  #: int32, tokens per sequence
    sequence_pointers: np.ndarray  #: int64, byte offset of each sequence in the .bin
    document_indices: np.ndarray  #: int64, documents + 1 boundaries into the sequences


def read_index(idx_path: Path) -> MmapIndex:
    """The index at ``idx_path``; a file that is not one (header, version, dtype, size against its counts) is a
    ``NevaError`` naming it."""
    from megatron.core.datasets.indexed_dataset import DType

    size = idx_path.stat().st_size
    with open(idx_path, "rb") as fh:
        header = fh.read(_INDEX_HEADER_SIZE)
    if len(header) < _INDEX_HEADER_SIZE or not header.startswith(_INDEX_MAGIC):
        raise NevaError(f"{idx_path} is not a readable Megatron index (no MMIDIDX header of {_INDEX_HEADER_SIZE} "
                        f"bytes: {size:,} bytes); {_AGAIN}")  # fmt: skip
    version, code, count, documents = struct.unpack("<QBQQ", header[len(_INDEX_MAGIC) :])
    try:
        dtype = np.dtype(DType.dtype_from_code(code))
    except (KeyError, ValueError):
        dtype = None
    if version != 1 or dtype is None:
        raise NevaError(f"{idx_path} is not a readable Megatron index (version {version}, dtype code {code}); "
                        f"{_AGAIN}")  # fmt: skip
    described = _INDEX_HEADER_SIZE + 12 * count + 8 * documents  # lengths (int32), pointers (int64), documents
    if size not in (described, described + count):  # + one mode byte per sequence in multimodal indexes
        raise NevaError(f"{idx_path} holds {size:,} bytes but its header describes {count:,} sequences and "
                        f"{max(documents - 1, 0):,} documents ({described:,} bytes): it is truncated or corrupt; "
                        f"{_AGAIN}")  # fmt: skip
    if count == 0 or documents < 2:
        raise NevaError(f"{idx_path} describes an empty dataset (no document): a dataset needs at least one; check "
                        "the input given to neva data preprocess")  # fmt: skip
    data = np.memmap(idx_path, mode="r", dtype=np.uint8)
    at = _INDEX_HEADER_SIZE
    lengths = np.frombuffer(data, np.int32, count, at)
    pointers = np.frombuffer(data, np.int64, count, at + 4 * count)
    bounds = np.frombuffer(data, np.int64, documents, at + 12 * count)
    return MmapIndex(dtype, int(count), lengths, pointers, bounds)


def check_index(index: MmapIndex, bin_path: Path, idx_path: Path) -> int:
    """The tokens of a dataset whose ``.idx`` and ``.bin`` agree, else a ``NevaError`` naming the file and both
    sizes: documents covering the sequences in order, each sequence starting where the previous one ends, and the
    ``.bin`` exactly as long as the sequences."""
    count, documents = index.sequence_count, index.document_indices
    lengths, pointers, itemsize = index.sequence_lengths, index.sequence_pointers, index.dtype.itemsize
    if int(documents[0]) != 0 or int(documents[-1]) != count or bool((np.diff(documents) < 0).any()):
        raise NevaError(f"{idx_path}: its document boundaries do not cover its {count:,} sequences in order (first "
                        f"{int(documents[0])}, last {int(documents[-1])}): the index is corrupt; {_AGAIN}")  # fmt: skip
    tokens = 0
    for start in range(0, count, _CHECK_CHUNK):
        stop = min(count, start + _CHECK_CHUNK + 1)  # one sequence of overlap: the step across chunks is checked
        sizes = lengths[start:stop].astype(np.int64)
        starts = pointers[start:stop].astype(np.int64)
        tokens += int(sizes[: _CHECK_CHUNK if stop < count else None].sum())
        bad = np.flatnonzero((sizes[:-1] < 0) | (starts[1:] != starts[:-1] + sizes[:-1] * itemsize))
        if start == 0 and starts[0] != 0:
            raise NevaError(f"{idx_path}: its first sequence starts at byte {int(starts[0]):,} of the .bin, not 0: "
                            f"the index is corrupt; {_AGAIN}")  # fmt: skip
        if bad.size or sizes[-1] < 0:
            i = start + (int(bad[0]) if bad.size else len(sizes) - 1)
            after = f", and sequence {i + 1:,} starts at {int(pointers[i + 1]):,}" if i + 1 < count else ""
            raise NevaError(f"{idx_path}: sequence {i:,} (at byte {int(pointers[i]):,}, {int(lengths[i]):,} tokens of "
                            f"{itemsize} bytes){after}: the sequences do not follow each other, the index is "
                            f"corrupt; {_AGAIN}")  # fmt: skip
    expected = int(pointers[count - 1]) + int(lengths[count - 1]) * itemsize
    actual = bin_path.stat().st_size
    if actual != expected:
        state = "is truncated" if actual < expected else "holds bytes beyond them"
        raise NevaError(f"{bin_path} holds {actual:,} bytes but its index {idx_path} describes {tokens:,} tokens of "
                        f"{index.dtype.name} ({expected:,} bytes): the .bin {state} or belongs to another index; "
                        f"{_AGAIN}")  # fmt: skip
    return tokens
