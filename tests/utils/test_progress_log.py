"""Progress off a terminal is plain log lines (one per interval and one at the end, no carriage returns, no bar);
short work logs none; on a terminal, or on a file given by the caller, it stays a tqdm bar."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest

from neva_tools.utils import log, progress_log


class Lines(logging.Handler):
    """The messages logged to the progress logger (a handler of its own: the root's set-up, which an in-process
    ``neva -q`` of another test may have left filtering, does not matter)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def lines(monkeypatch: pytest.MonkeyPatch) -> Iterator[Lines]:
    monkeypatch.setattr(log, "_PROGRESS_ENABLED", True)
    monkeypatch.setattr(progress_log, "is_terminal", lambda stream: False)
    handler, logger = Lines(), progress_log.logger
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def messages(lines: Lines) -> list[str]:
    return lines.messages


def test_long_work_logs_lines_with_counts_rate_and_eta(lines: Lines,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setattr(progress_log, "EVERY_S", 0.05)
    for _ in log.progress(range(6), desc="MMBench", unit="q"):
        time.sleep(0.03)
    got = messages(lines)
    assert 2 <= len(got) <= 6 and len(set(got)) == len(got)  # a line per interval, the last one not repeated
    assert got[-1].startswith("MMBench: 6/6 (100%) | ") and "q/s | elapsed 00:00 | ETA 00:00" in got[-1]
    assert all(line.startswith("MMBench: ") and "\r" not in line and "|#" not in line for line in got)
    assert "  " not in "".join(got)


def test_unknown_total_and_scaled_units(lines: Lines, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress_log, "EVERY_S", 0.05)
    with log.progress(desc="tokenizing a.jsonl", unit=" lines") as bar:
        for _ in range(3):
            time.sleep(0.03)
            bar.update(100)
    with log.progress(total=3 * 2**20, desc="repartition", unit="B", unit_scale=True) as bar:
        for _ in range(3):
            time.sleep(0.03)
            bar.update(2**20)
    got = messages(lines)
    assert "tokenizing a.jsonl: 300 | " in "\n".join(got) and all("ETA" not in m for m in got if "tokenizing" in m)
    assert got[-1].startswith("repartition: 3.15M/3.15M (100%) | ") and "B/s" in got[-1]


def test_short_work_logs_nothing(lines: Lines) -> None:
    assert sum(log.progress(range(100), desc="quick")) == 4950
    assert messages(lines) == []


def test_off_when_disabled(lines: Lines, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress_log, "EVERY_S", 0.0)
    monkeypatch.setattr(log, "_PROGRESS_ENABLED", False)  # -q, --no-progress, NEVA_NO_PROGRESS
    list(log.progress(range(3), desc="off"))
    list(log.progress(range(3), desc="off too", disable=True))
    assert messages(lines) == []


def test_a_terminal_or_a_given_file_gets_the_bar(lines: Lines, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    import io

    out = io.StringIO()
    list(log.progress(range(3), desc="to a file", file=out))
    assert "to a file: 100%" in out.getvalue() and "\r" in out.getvalue()
    monkeypatch.setattr(progress_log, "is_terminal", lambda stream: True)
    list(log.progress(range(3), desc="on a terminal"))
    assert "on a terminal: 100%" in capsys.readouterr().err
    assert messages(lines) == []
