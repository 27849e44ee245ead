"""Progress where no bar can be drawn (output in a log file: nohup, SLURM, a pipe): plain ``logging`` lines.

A tqdm bar written to a file leaves one long line of carriage-return-joined redraws. Off a terminal,
:func:`~neva_tools.utils.log.progress` gives tqdm a :class:`LogLines` file instead, a bar format without the bar,
and :data:`EVERY_S` as both its refresh interval and its delay: work that ends within that time logs nothing; longer
work logs a line every :data:`EVERY_S` seconds and one when it ends::

    INFO: MMBench: 320/660 (48%) | 10.7q/s | elapsed 00:30 | ETA 00:33
"""

from __future__ import annotations

import logging
import os
from typing import Any, TextIO

logger = logging.getLogger("neva_tools.progress")

EVERY_S = 30.0  #: seconds between two progress lines (and before the first)
FORMAT_TOTAL = "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%) | {rate_fmt} | elapsed {elapsed} | ETA {remaining}"
FORMAT_COUNT = "{desc}: {n_fmt} | {rate_fmt} | elapsed {elapsed}"  #: when the total is not known


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is a terminal a bar can be drawn on (a TTY with a width; a pseudo-terminal of width 0, as
    some launchers give, would show nothing)."""
    try:
        return stream.isatty() and os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, OSError, ValueError):
        return False


class LogLines:
    """A write-only text file for tqdm: each redraw it writes becomes one INFO line of :data:`logger` (spaces
    collapsed; a redraw equal to the previous line, as the one on closing often is, is not repeated)."""

    def __init__(self) -> None:
        self.last = ""

    def write(self, text: str) -> int:
        for line in text.replace("\r", "\n").split("\n"):
            line = " ".join(line.split())
            if line and line != self.last:
                logger.info("%s", line)
                self.last = line
        return len(text)

    def flush(self) -> None:
        return None


def line_kwargs(iterable: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """tqdm's arguments for progress as log lines: ``kwargs`` with the file, the interval and the bar format."""
    total = kwargs.get("total", len(iterable) if hasattr(iterable, "__len__") else None)
    known = total is not None and total > 0
    lines = {"file": LogLines(), "mininterval": EVERY_S, "delay": EVERY_S, "ascii": True,
             "bar_format": FORMAT_TOTAL if known else FORMAT_COUNT}  # fmt: skip
    return {**{k: v for k, v in kwargs.items() if k not in lines and k != "dynamic_ncols"}, **lines}
