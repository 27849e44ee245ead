"""Results appended as they are produced, so that an interrupted evaluation continues where it stopped.

An :class:`AnswerLog` is a JSONL file of result rows, each keyed by one field (MMBench's ``index``, LLaVA's
``question_id``). Every batch of rows is written, flushed and ``fsync``'d before the next batch is asked; reopening
the file gives back the finished keys, so nothing is asked twice. A log may start with a ``{"_meta": {...}}`` line
(what produced the answers: model, data, settings): reopening it with other settings is a ``NevaError`` rather than a
mix of two models' answers. A last line cut short by a kill is dropped (and cut from the file) with a warning.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Hashable, Iterable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from neva_tools.errors import NevaError

logger = logging.getLogger(__name__)
META = "_meta"


class AnswerLog:
    """The rows of ``path`` keyed by ``key`` (``done``), and :meth:`append` for new ones (only when ``write``)."""

    def __init__(self, path: str | Path, key: str, *, meta: dict[str, Any] | None = None, fresh: bool = False,
                 write: bool = True) -> None:  # fmt: skip
        self.path, self.key, self.meta, self.write = Path(path), key, meta, write
        self.done: dict[Hashable, dict[str, Any]] = {}
        self._fh: IO[str] | None = None
        if fresh and write and self.path.exists():
            self.path.unlink()
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        data = self.path.read_bytes()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            logger.warning("%s: its last line was cut short (an interrupted write); dropping it", self.path)
            if self.write:
                with open(self.path, "r+b") as fh:
                    fh.truncate(complete)
        lines = data[:complete].decode("utf-8").splitlines()
        for number, line in enumerate(lines, 1):
            where = f"{self.path}:line {number}"
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise NevaError(f"{where} is not JSON ({exc}); remove the file to start over") from None
            if not isinstance(row, dict):
                raise NevaError(f"{where}: expected a JSON object, found {type(row).__name__}")
            if META in row:
                self._check_meta(row[META], where)
                continue
            if self.key not in row or not isinstance(row[self.key], Hashable):
                raise NevaError(f"{where}: no usable {self.key!r} key; this is not an answers file of this "
                                "evaluation: choose another output or remove it")  # fmt: skip
            self.done[row[self.key]] = row
        if self.meta is not None and lines and META not in json.loads(lines[0]):
            raise NevaError(f"{self.path} does not start with the settings line of an earlier run of this evaluation; "
                            "choose another output or remove it")  # fmt: skip
        if self.done:
            logger.info("%s: resuming after %d finished answer(s)", self.path, len(self.done))

    def _check_meta(self, found: Any, where: str) -> None:
        if self.meta is None:
            raise NevaError(f"{where}: unexpected settings line in an answers file")
        changed = {k: (found.get(k), v) for k, v in self.meta.items() if found.get(k) != v}
        if changed:
            listed = "; ".join(f"{k}: {old!r} then, {new!r} now" for k, (old, new) in changed.items())
            raise NevaError(f"{self.path} holds answers of another run ({listed}); pass --no-resume to start over or "
                            "choose another --output")  # fmt: skip

    def __enter__(self) -> AnswerLog:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        """Record ``rows`` (durably: flushed and fsync'd) and mark their keys done."""
        rows = list(rows)
        for row in rows:
            self.done[row[self.key]] = row
        if not self.write or not rows:
            return
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            new = not self.path.exists() or self.path.stat().st_size == 0
            self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open for the run)
            if new and self.meta is not None:
                self._fh.write(json.dumps({META: self.meta}, ensure_ascii=False) + "\n")
        self._fh.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        self._fh.flush()
        os.fsync(self._fh.fileno())
