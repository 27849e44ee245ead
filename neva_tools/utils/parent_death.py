"""Processes that end with the process that started them: Linux's parent-death signal.

A process killed with SIGKILL runs no clean-up, so helper processes it started (a ``multiprocessing`` manager, a
pool) outlive it unless they ask the kernel to be signalled when their parent dies (``prctl(PR_SET_PDEATHSIG)``).
:func:`set_pdeathsig` asks; :func:`die_with_parent` is the initializer such a helper runs first.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def set_pdeathsig(sig: int) -> bool:
    """``prctl(PR_SET_PDEATHSIG, sig)``; False where it is not available (not Linux) or fails."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0:
            return True
        logger.debug("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as exc:
        logger.debug("prctl is not available: %s", exc)
    return False


def die_with_parent(parent: int) -> None:
    """In a helper process started by ``parent``: be killed when it dies, or end now if it already has (the
    signal only covers a death after the call)."""
    set_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)
