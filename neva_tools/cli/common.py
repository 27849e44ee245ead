"""Options shared by every subcommand, and small argparse helpers."""

from __future__ import annotations

import argparse


def common_parser() -> argparse.ArgumentParser:
    """A parent parser with the logging and progress flags every subcommand accepts."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("output")
    group.add_argument("-v", "--verbose", action="count", default=0, help="more log output (DEBUG)")
    group.add_argument("-q", "--quiet", action="count", default=0, help="only warnings and errors")
    group.add_argument("--no-progress", action="store_true", help="no progress bars (also: NEVA_NO_PROGRESS=1)")
    return common


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number
