"""Shared argument handling for the NeMo drop-in conversion scripts in ``scripts/``."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence

from neva_tools.cli import boundary
from neva_tools.errors import NevaError
from neva_tools.utils.log import setup_logging
from neva_tools.utils.resources import return_freed_memory_to_os

logger = logging.getLogger(__name__)

#: NeMo's ``--precision`` values → our dtype names.
PRECISION_TO_DTYPE = {
    "16": "fp16",
    "16-mixed": "fp16",
    "fp16": "fp16",
    "bf16": "bf16",
    "bf16-mixed": "bf16",
    "32": "fp32",
    "32-true": "fp32",
    "fp32": "fp32",
}


def precision_dtype(precision: str | None) -> str | None:
    """Map NeMo's ``--precision`` to a dtype name; ``None`` keeps the checkpoint's dtype."""
    if precision is None:
        return None
    if precision not in PRECISION_TO_DTYPE:
        raise NevaError(f"--precision {precision!r} is not one of {', '.join(PRECISION_TO_DTYPE)}")
    return PRECISION_TO_DTYPE[precision]


def run_dropin(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], None], argv: Sequence[str]) -> int:
    """Parse NeMo's flags (unknown ones are accepted and reported as ignored) and run ``body``."""
    setup_logging()
    return_freed_memory_to_os()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        logger.warning("ignoring NeMo options this tool does not need: %s", " ".join(unknown))
    return boundary.run_dropin(lambda: body(args), lambda: args)
