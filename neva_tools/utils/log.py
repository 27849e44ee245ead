"""Logging set-up and progress bars that show on rank 0 only and can be turned off."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from tqdm import tqdm

_PROGRESS_ENABLED = True


def global_rank() -> int:
    """The process's global rank from the launcher's environment (0 when not distributed)."""
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def setup_logging(verbosity: int = 0, progress: bool = True) -> None:
    """Configure the root logger: INFO by default, DEBUG with ``-v``, WARNING with ``-q``."""
    global _PROGRESS_ENABLED
    _PROGRESS_ENABLED = progress and os.environ.get("NEVA_NO_PROGRESS", "") in ("", "0")
    level = logging.DEBUG if verbosity > 0 else logging.WARNING if verbosity < 0 else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s", stream=sys.stderr, force=True)


def progress(iterable: Any = None, **kwargs: Any) -> tqdm:
    """A tqdm bar on rank 0 when progress is enabled; a silent pass-through elsewhere."""
    disable = not _PROGRESS_ENABLED or global_rank() != 0 or kwargs.pop("disable", False)
    return tqdm(iterable, disable=disable, dynamic_ncols=True, **kwargs)
