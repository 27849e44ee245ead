"""Resource figures for summaries: peak resident memory and human-readable sizes."""

from __future__ import annotations

import resource


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def human_bytes(n: float) -> str:
    """``1536`` → ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def return_freed_memory_to_os(threshold: int = 4 << 20) -> bool:
    """Make glibc serve allocations above ``threshold`` bytes with mmap, so freed tensors go back to the OS.

    glibc's adaptive threshold grows to 32 MiB once large blocks are freed; tensors below it then come
    from the heap, whose freed space stays resident. Streaming conversions free one tensor after
    another, so without this their peak RSS drifts well above what they hold. A no-op where glibc's
    ``mallopt`` is not available. Returns True when the setting was applied.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(-3, threshold))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False
