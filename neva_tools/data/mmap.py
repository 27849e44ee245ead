"""Tokenize loose JSONL into Megatron's mmap ``.bin/.idx`` pair, and count the tokens of one.

``preprocess_jsonl`` does what Megatron-LM's ``tools/preprocess_data.py`` does for pre-training text,
with megatron-core's own ``IndexedDatasetBuilder``: one document of one sequence per JSON line
(``add_item`` + ``end_document``), token dtype from the vocabulary size (``DType.optimal_dtype``:
uint16 below 65500 ids, else int32) and, with ``append_eod``, the tokenizer's EOS after each document.
The outputs are ``{prefix}_{json_key}_document.bin/.idx``; ``{prefix}_{json_key}_document`` is the
prefix that ``DATA_PATH`` and ``count_tokens`` take.

Differences from Megatron's tool, on purpose:
- a bad line (not JSON, not an object, key missing, value not a string, not UTF-8) is an error naming
  the file, the line and what was found; nothing is skipped silently. Whitespace-only lines are not
  records and are skipped (counted in the summary);
- an empty text is a document with one empty sequence (``[EOD]`` with ``append_eod``), so documents,
  sequences and input lines always match (Megatron's tool writes a document with no sequence);
- both files are written under hidden temporary names next to the target and renamed together at the
  end: a failure or interrupt leaves neither (a killed run's temporaries, named by its pid, are removed
  with a note by the next run writing the same output; a full disk is an error naming the output).
  ``overwrite`` replaces only an earlier ``.bin``/``.idx`` pair (the ``.idx`` starting with megatron's
  ``MMIDIDX`` header), never other files;
- with ``workers > 1`` at most ``4 * workers`` chunks are in flight (``Pool.imap`` reads the whole input
  ahead when the workers are slower than the reader); the output is byte-identical to ``workers=1``.

Worker processes (a ``ProcessPoolExecutor``) are started with ``spawn`` and load the tokenizer once each,
in the initializer; this module imports neither torch nor megatron at module level, so starting a
worker is cheap. As with any ``spawn`` pool, the calling script needs an ``if __name__ == "__main__":``
guard (and cannot be read from stdin).
"""

from __future__ import annotations

import collections
import contextlib
import json
import multiprocessing
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neva_tools.data.mmap_index import check_index, read_index
from neva_tools.errors import NevaError
from neva_tools.utils.atomic import (
    MMAP_BIN,
    MMAP_IDX,
    check_output_path,
    disk_full,
    disk_full_error,
    kill_point,
    remove_stale_temporaries,
    temp_path,
)
from neva_tools.utils.log import progress

_SNIPPET = 80


@dataclass(frozen=True)
class PreprocessSummary:
    """What ``preprocess_jsonl`` wrote."""

    prefix: Path
    bin_path: Path
    idx_path: Path
    documents: int
    tokens: int
    blank_lines: int
    bytes_in: int
    dtype: str
    seconds: float


@dataclass(frozen=True)
class TokenCount:
    """Sizes of one mmap dataset, read from its ``.idx``."""

    prefix: Path
    documents: int
    sequences: int
    tokens: int
    dtype: str


def dataset_prefix(path: str | os.PathLike) -> Path:
    """A dataset prefix from a prefix or from the path of its ``.bin``/``.idx``."""
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".bin", ".idx") else path


def document_prefix(output_prefix: str | os.PathLike, json_key: str) -> Path:
    """``{output_prefix}_{json_key}_document``, the prefix ``preprocess_jsonl`` writes (Megatron's naming)."""
    prefix = Path(output_prefix)
    return prefix.with_name(f"{prefix.name}_{json_key}_document")


# --- tokenization, in worker processes or inline -------------------------------------------------------


class _Encoder:
    """Turns a chunk of raw JSONL lines into token ids and per-document lengths, or an error."""

    def __init__(self, tokenizer_path: str, json_key: str, eod: int | None, dtype: str) -> None:
        from neva_tools.tokenizer.text import TextTokenizer

        self.encode = TextTokenizer(tokenizer_path).encode
        self.json_key = json_key
        self.eod = eod
        self.dtype = np.dtype(dtype)

    def __call__(self, task: tuple[int, list[bytes]]) -> tuple[np.ndarray, np.ndarray, int, tuple[int, str] | None]:
        """``(first line number, lines)`` → ``(tokens, lengths, blank lines, (line number, error) or None)``."""
        first, lines = task
        ids: list[int] = []
        lengths: list[int] = []
        blank = 0
        for number, raw in enumerate(lines, start=first):
            if not raw.strip():
                blank += 1
                continue
            try:
                doc = self.encode(self._text(raw))
            except _BadLine as exc:
                return np.empty(0, self.dtype), np.empty(0, np.int64), blank, (number, str(exc))
            if self.eod is not None:
                doc.append(self.eod)
            ids.extend(doc)
            lengths.append(len(doc))
        return np.array(ids, dtype=self.dtype), np.array(lengths, dtype=np.int64), blank, None

    def _text(self, raw: bytes) -> str:
        """The line's text; ``_BadLine`` says what is wrong with the line otherwise."""
        snippet = raw[:_SNIPPET].decode("utf-8", errors="replace").rstrip("\n")
        snippet = repr(snippet + ("..." if len(raw) > _SNIPPET else ""))
        try:
            record = json.loads(raw)
        except UnicodeDecodeError as exc:
            message = f"not UTF-8 ({exc.reason} at byte {exc.start}): {snippet}; re-encode the file as UTF-8"
            raise _BadLine(message) from None
        except json.JSONDecodeError as exc:
            message = f"not valid JSON ({exc.msg} at column {exc.colno}): {snippet}; fix or remove the line"
            raise _BadLine(message) from None
        except RecursionError:
            raise _BadLine(f"nested too deeply to parse: {snippet}; fix or remove the line") from None
        if not isinstance(record, dict):
            raise _BadLine(f"expected a JSON object, found a {type(record).__name__}: {snippet}")
        if self.json_key not in record:
            keys = ", ".join(map(repr, list(record)[:10])) or "none"
            raise _BadLine(f"no {self.json_key!r} key (keys found: {keys}); name the text field with json_key")
        value = record[self.json_key]
        if not isinstance(value, str):
            found = json.dumps(value)[:_SNIPPET]
            raise _BadLine(f"{self.json_key!r} is a {type(value).__name__} ({found}), not a string")
        return value


class _BadLine(Exception):
    """A JSONL line that is not a record with a string text field (reported with its file and line)."""


_ENCODER: _Encoder | None = None


def _init_worker(tokenizer_path: str, json_key: str, eod: int | None, dtype: str) -> None:
    """Pool initializer: load the tokenizer once per worker process."""
    global _ENCODER
    _ENCODER = _Encoder(tokenizer_path, json_key, eod, dtype)


def _encode_chunk(task: tuple[int, list[bytes]]) -> tuple[np.ndarray, np.ndarray, int, tuple[int, str] | None]:
    assert _ENCODER is not None, "worker not initialised"
    return _ENCODER(task)


def _chunks(path: Path, chunk_size: int) -> Iterator[tuple[int, list[bytes]]]:
    """``(first line number (1-based), raw lines)`` of ``path``, ``chunk_size`` lines at a time."""
    with open(path, "rb") as fh:
        first, lines = 1, []
        for line in fh:
            lines.append(line)
            if len(lines) == chunk_size:
                yield first, lines
                first, lines = first + chunk_size, []
        if lines:
            yield first, lines


def _ordered_map(executor: Any, func: Any, tasks: Iterator[Any], window: int) -> Iterator[tuple[Any, Any]]:
    """``(task, func(task))`` in order, with at most ``window`` tasks in flight (bounded memory)."""
    pending: collections.deque = collections.deque()
    for task in tasks:
        pending.append((task, executor.submit(func, task)))
        if len(pending) >= window:
            done, future = pending.popleft()
            yield done, future.result()
    while pending:
        done, future = pending.popleft()
        yield done, future.result()


def _count_lines(paths: Sequence[Path]) -> int:
    total = 0
    for path in paths:
        with open(path, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 24), b""):
                total += block.count(b"\n")
    return total


# --- the public functions ------------------------------------------------------------------------------


def preprocess_jsonl(
    input: str | os.PathLike | Sequence[str | os.PathLike],
    output_prefix: str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    *,
    json_key: str = "text",
    append_eod: bool = False,
    workers: int = 1,
    overwrite: bool = False,
    chunk_size: int = 1024,
) -> PreprocessSummary:
    """Tokenize JSONL file(s), one document per line, into ``{output_prefix}_{json_key}_document.bin/.idx``.

    Several inputs are concatenated in the order given. ``workers > 1`` tokenizes ``chunk_size`` lines per
    task in a spawned process pool; the output does not depend on ``workers`` or ``chunk_size``.
    """
    start = time.perf_counter()
    inputs = [Path(p) for p in ([input] if isinstance(input, str | os.PathLike) else input)]
    if not inputs:
        raise NevaError("no input files given; pass one or more JSONL files")
    for path in inputs:
        if not path.is_file():
            raise NevaError(f"input {path} does not exist (expected a JSONL file, one JSON object per line)")
    if workers < 1 or chunk_size < 1:
        raise NevaError(f"workers ({workers}) and chunk_size ({chunk_size}) must be at least 1")
    if not json_key:
        raise NevaError("json_key is empty; give the name of the JSON field that holds the text")
    prefix = document_prefix(output_prefix, json_key)
    bin_path, idx_path = prefix.with_name(prefix.name + ".bin"), prefix.with_name(prefix.name + ".idx")
    check_output_path(bin_path, overwrite, MMAP_BIN)
    check_output_path(idx_path, overwrite, MMAP_IDX)

    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from neva_tools.tokenizer.text import TextTokenizer

    tokenizer = TextTokenizer(tokenizer_path)
    eod = tokenizer.eos_id if append_eod else None
    if append_eod and eod is None:
        raise NevaError(f"tokenizer {tokenizer_path} has no EOS token, so append_eod cannot be used; drop it")
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    for target in (bin_path, idx_path):  # left by a killed run (its pid gone): removed with a note
        remove_stale_temporaries(target)
    tmp_bin, tmp_idx = temp_path(bin_path), temp_path(idx_path)
    args = (str(tokenizer_path), json_key, eod, np.dtype(dtype).str)

    documents = tokens = blank = 0
    builder = None
    bar = progress(desc=f"tokenizing {inputs[0].name}" + (" ..." if len(inputs) > 1 else ""), unit=" lines")
    try:
        if not bar.disable:
            bar.total = _count_lines(inputs)
            bar.refresh()
        builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
        kill_point("preprocess")
        with _tokenizer_pool(workers, args) as encode:
            for path in inputs:
                for (_first, lines), (ids, lengths, chunk_blank, error) in encode(_chunks(path, chunk_size)):
                    if error is not None:
                        raise NevaError(f"{path}:{error[0]}: {error[1]}")
                    ends = np.cumsum(lengths).tolist()
                    for begin, end in zip([0, *ends[:-1]], ends, strict=True):
                        builder.add_item(torch.from_numpy(ids[begin:end]))
                        builder.end_document()
                    documents += len(lengths)
                    tokens += int(ids.size)
                    blank += chunk_blank
                    bar.update(len(lines))
        builder.finalize(str(tmp_idx))
        os.replace(tmp_bin, bin_path)
        try:
            os.replace(tmp_idx, idx_path)
        except BaseException:
            bin_path.unlink(missing_ok=True)
            raise
    except BaseException as exc:
        if builder is not None and not builder.data_file.closed:
            with contextlib.suppress(OSError):  # on a full disk, closing flushes the buffer and fails again
                builder.data_file.close()
        tmp_bin.unlink(missing_ok=True)
        tmp_idx.unlink(missing_ok=True)
        full = disk_full(exc)
        if full is not None:
            raise disk_full_error(bin_path, full, removed="the partial .bin and .idx were removed") from None
        raise
    finally:
        bar.close()
    return PreprocessSummary(
        prefix=prefix,
        bin_path=bin_path,
        idx_path=idx_path,
        documents=documents,
        tokens=tokens,
        blank_lines=blank,
        bytes_in=sum(p.stat().st_size for p in inputs),
        dtype=np.dtype(dtype).name,
        seconds=time.perf_counter() - start,
    )


@contextlib.contextmanager
def _tokenizer_pool(workers: int, args: tuple[Any, ...]) -> Iterator[Any]:
    """Yield ``encode(tasks) -> iterator of (task, result)``: inline for one worker, else spawned processes.

    ``ProcessPoolExecutor`` rather than ``multiprocessing.Pool``: a worker that dies (or whose initializer
    fails) breaks the executor with an error instead of being respawned forever while the caller waits.
    """
    if workers == 1:
        encoder = _Encoder(*args)
        yield lambda tasks: ((task, encoder(task)) for task in tasks)
        return
    context = multiprocessing.get_context("spawn")
    executor = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=args)
    try:
        yield lambda tasks: _ordered_map(executor, _encode_chunk, tasks, 4 * workers)
    except BrokenProcessPool as exc:
        raise NevaError(f"a tokenizer worker process died ({exc}); retry with workers=1 to see the error") from None
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def count_tokens(prefix: str | os.PathLike) -> TokenCount:
    """Documents, sequences and tokens of the mmap dataset at ``prefix`` (``.bin``/``.idx`` paths accepted)."""
    prefix = dataset_prefix(prefix)
    bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    missing = [str(p) for p in (bin_path, idx_path) if not p.is_file()]
    if missing:
        raise NevaError(
            f"no mmap dataset at prefix {prefix}: {bin_path} and {idx_path} are both needed, "
            f"missing {', '.join(missing)}; create them with preprocess_jsonl (neva data preprocess)"
        )
    index = read_index(idx_path)
    tokens = check_index(index, bin_path, idx_path)
    return TokenCount(
        prefix=prefix,
        documents=len(index.document_indices) - 1,
        sequences=index.sequence_count,
        tokens=tokens,
        dtype=index.dtype.name,
    )
