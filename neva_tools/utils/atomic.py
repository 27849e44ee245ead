"""Atomic outputs: write to a temporary path next to the target, rename when complete.

A failure (exception, Ctrl-C, kill) never leaves a half-written output at the target path; the
temporary path is removed on exceptions and is hidden (``.<name>.tmp-<random>``) otherwise.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from neva_tools.errors import NevaError


def check_output_path(path: Path, overwrite: bool) -> None:
    """Refuse an existing output unless ``overwrite`` is set."""
    if path.exists() and not overwrite:
        raise NevaError(f"output {path} already exists; pass --overwrite to replace it, or choose another path")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace(tmp: Path, target: Path) -> None:
    if target.is_dir() and not target.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, directory: bool = False, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path (a file path, or a created directory) that becomes ``target`` on success."""
    target = Path(target)
    check_output_path(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
        os.close(fd)
        tmp = Path(name)
    os.chmod(tmp, (0o777 if directory else 0o666) & ~_umask())  # mkstemp/mkdtemp are private (0600/0700)
    try:
        yield tmp
        _replace(tmp, target)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
