"""Options shared by every subcommand, and small argparse helpers."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

#: The output flags, accepted before the subcommand (``neva -q data validate``) and after it.
OUTPUT_FLAGS = ("verbose", "quiet", "no_progress")
_TOP = "top_"  # the top-level parser's destinations (a subcommand's parser would overwrite the same names)


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are printed by one process of a multi-process job."""

    def error(self, message: str) -> NoReturn:
        from neva_tools.utils.log import first_to_report

        if first_to_report():  # a usage error is a user error: told once per job, as NevaError is
            super().error(message)
        sys.exit(2)


def add_output_flags(parser: argparse.ArgumentParser, *, top_level: bool = False) -> None:
    """Add ``-v``/``-q``/``--no-progress``; a subcommand's copies default to nothing, so that the flags given at
    any level add up (:func:`merge_output_flags`)."""
    dest = _TOP if top_level else ""
    default = {} if top_level else {"default": argparse.SUPPRESS}
    group = parser.add_argument_group("output")
    group.add_argument("-v", "--verbose", action="count", dest=dest + "verbose", **default,
                       help="more output: libraries' INFO and our DEBUG lines (-vv: libraries' DEBUG too), every "
                       "rank")  # fmt: skip
    group.add_argument("-q", "--quiet", action="count", dest=dest + "quiet", **default,
                       help="only errors and the command's result; no progress bars")  # fmt: skip
    group.add_argument("--no-progress", action="store_true", dest=dest + "no_progress", **default,
                       help="no progress bars (also: NEVA_NO_PROGRESS=1)")  # fmt: skip


def merge_output_flags(args: argparse.Namespace) -> int:
    """Put the output flags given before and after the subcommand together in ``args.verbose``, ``args.quiet`` and
    ``args.no_progress`` (``-q`` implies ``--no-progress``); return the verbosity, ``-v`` count minus ``-q`` count."""
    args.verbose = (getattr(args, _TOP + "verbose", None) or 0) + (getattr(args, "verbose", None) or 0)
    args.quiet = (getattr(args, _TOP + "quiet", None) or 0) + (getattr(args, "quiet", None) or 0)
    args.no_progress = bool(getattr(args, _TOP + "no_progress", False) or getattr(args, "no_progress", False)
                            or args.quiet > args.verbose)  # fmt: skip
    for name in OUTPUT_FLAGS:
        if hasattr(args, _TOP + name):
            delattr(args, _TOP + name)
    return args.verbose - args.quiet


def common_parser() -> argparse.ArgumentParser:
    """A parent parser with the output flags every subcommand accepts."""
    common = argparse.ArgumentParser(add_help=False)
    add_output_flags(common)
    return common


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number
