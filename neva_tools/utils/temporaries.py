"""Temporaries and scratch directories that name their writer, and full disks told as our error.

A temporary next to an output is hidden and names its writer: ``.<name>.<role>-<pid>-<host>-<random>`` (``<host>``:
8 hex digits of the machine's name and PID namespace). One that a killed process (SIGKILL, OOM, power loss) left is
removed, with a note, by the next writer of the same output once its pid is gone on this machine
(``remove_stale_temporaries``). Scratch directories (``scratch_directory``, ``scratch``) live in ``$TMPDIR`` and are
removed when the process exits (or the ``with`` block ends); those of killed processes are removed by the next one.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import hashlib
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from neva_tools.errors import NevaError

logger = logging.getLogger(__name__)

# --- temporaries -----------------------------------------------------------------------------------------------

#: Test hook: ``NEVA_TEST_KILL_AT=<point>`` makes the process SIGKILL itself at that point of a writer, as a crash or
#: ``kill -9`` would (no timing needed). Points: ``atomic`` (``atomic_path`` created its temporary), ``dist-staging``
#: (a ``.nemo``'s dist checkpoint is staged), ``preprocess`` (``neva data preprocess`` opened its temporary ``.bin``).
KILL_AT_VAR = "NEVA_TEST_KILL_AT"
#: What a writer leaves next to its output: ``tmp`` the output being written, ``old`` a replaced output being
#: deleted, ``stage`` files staged for the output (a ``.nemo``'s dist checkpoint).
TEMP_ROLES = ("tmp", "old", "stage")
SCRATCH_PREFIX = "neva-scratch-"  #: scratch directories in the system's temporary directory ($TMPDIR)
_TAG = re.compile(r"(?:(?P<role>[a-z]+)-)?(?P<pid>\d{1,10})-(?P<host>[0-9a-f]{8})-[0-9a-f]{8}")
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\] ([^:\n]+)(?:: '([^'\n]+)')?")  # an OSError that crossed a process as text
_RUST_OS_ERROR = re.compile(r"(?:Os \{ code: |\(os error )(\d+)")  # std::io::Error (safetensors, tokenizers)
PARTIAL_REMOVED = "the partial output was removed"


def kill_point(name: str) -> None:
    """SIGKILL this process when ``$NEVA_TEST_KILL_AT`` is ``name`` (see ``KILL_AT_VAR``)."""
    if os.environ.get(KILL_AT_VAR) == name:
        os.kill(os.getpid(), signal.SIGKILL)


@functools.cache
def host_tag() -> str:
    """8 hex digits naming this machine and PID namespace: a temporary's pid is only checked where it names the same
    process (a shared file system is written by other machines and containers too)."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return hashlib.sha1(f"{socket.gethostname()}:{namespace}".encode()).hexdigest()[:8]


def temp_path(target: str | os.PathLike, role: str = "tmp") -> Path:
    """An unused hidden name next to ``target``: ``.<name>.<role>-<pid>-<host>-<random>`` (not created)."""
    target = Path(target)
    return target.with_name(f".{target.name}.{role}-{os.getpid()}-{host_tag()}-{secrets.token_hex(4)}")


def _create(name: Callable[[], Path], is_dir: bool, mode: int | None = None) -> Path:
    """Create a new file or directory at ``name()`` (retried on a clash), with ``mode`` or the umask's permissions."""
    for _ in range(100):
        path = name()
        try:
            if is_dir:
                os.mkdir(path, 0o777 if mode is None else mode)
            else:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode))
        except FileExistsError:
            continue
        return path
    raise FileExistsError(errno.EEXIST, "no unused temporary name after 100 tries", str(name()))


def make_temp(target: str | os.PathLike, *, is_dir: bool, role: str = "tmp") -> Path:
    """Create a temporary file or directory next to ``target`` (``temp_path``) with the umask's permissions."""
    return _create(lambda: temp_path(target, role), is_dir)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # another user's process; not a pid this system knows
        return True
    return True


def _stale(folder: Path, prefix: str, roles: tuple[str, ...]) -> list[tuple[Path, int]]:
    """Entries ``<prefix>[<role>-]<pid>-<host>-<random>`` of ``folder`` written on this machine by a process that is
    gone, with its pid."""
    try:
        names = [entry.name for entry in os.scandir(folder) if entry.name.startswith(prefix)]
    except OSError:
        return []
    found = []
    for name in names:
        tag = _TAG.fullmatch(name[len(prefix) :])
        if tag is None or (tag["role"] or "") not in roles or tag["host"] != host_tag():
            continue
        pid = int(tag["pid"])
        if pid != os.getpid() and not _alive(pid):
            found.append((folder / name, pid))
    return found


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Remove the temporaries (``TEMP_ROLES``) that writers of ``target`` left next to it when they were killed (their
    pid no longer runs on this machine); log a note for each. Returns the removed paths."""
    target = Path(target)
    removed = []
    for path, pid in _stale(target.parent, f".{target.name}.", TEMP_ROLES):
        remove_path(path)
        if not os.path.lexists(path):
            removed.append(path)
            logger.info("removed %s: a temporary of %s left by process %d, which is no longer running (killed?)",
                        path, target.name, pid)  # fmt: skip
    return removed


def _remove_scratch(path: Path, owner: int) -> None:
    if os.getpid() == owner:  # not in a forked child that inherited the exit handler
        shutil.rmtree(path, ignore_errors=True)


def scratch_directory() -> Path:
    """A private directory in the system's temporary directory (``$TMPDIR/neva-scratch-<pid>-<host>-<random>``),
    removed when this process exits; the ones of processes that were killed are removed (with a note) first."""
    parent = Path(tempfile.gettempdir())
    for path, pid in _stale(parent, SCRATCH_PREFIX, ("",)):
        with contextlib.suppress(OSError):
            if path.lstat().st_uid != os.getuid():
                continue
        remove_path(path)
        if not os.path.lexists(path):
            logger.info("removed %s: a scratch directory left by process %d, which is no longer running", path, pid)
    token = f"{SCRATCH_PREFIX}{os.getpid()}-{host_tag()}-"
    path = _create(lambda: parent / f"{token}{secrets.token_hex(4)}", True, 0o700)
    atexit.register(_remove_scratch, path, os.getpid())
    return path


def disk_full(exc: BaseException) -> OSError | None:
    """The "no space left on device" (or "disk quota exceeded") ``OSError`` behind ``exc``, or None: ``exc`` itself,
    its causes, or a failure that torch's ``CheckpointException`` collected from a rank (where megatron-core's writer
    processes report it as text: ``RuntimeError("Worker failure: [Errno 28] …")``), or a Rust library's I/O error
    (safetensors: ``… Os { code: 28, kind: StorageFull, … }``)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return current
        text = None if isinstance(current, OSError) else _ERRNO_TEXT.search(str(current))
        if (
            text is not None and int(text[1]) in DISK_FULL_ERRNOS
        ):  # megatron-core's writer processes: "Worker failure: …"
            return OSError(int(text[1]), text[2], text[3])
        rust = None if isinstance(current, OSError) else _RUST_OS_ERROR.search(str(current))
        if rust is not None and int(rust[1]) in DISK_FULL_ERRNOS:
            return OSError(int(rust[1]), os.strerror(int(rust[1])))
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        todo += [current.__cause__, current.__context__]
    return None


def disk_full_error(target: str | os.PathLike, error: OSError, *, removed: str = PARTIAL_REMOVED) -> NevaError:
    """Our error for a full disk while writing ``target``: the output, the file that failed, what was cleaned up
    (``removed``) and what to do."""
    where = f" (writing {error.filename})" if error.filename and str(error.filename) != str(target) else ""
    return NevaError(f"{os.strerror(error.errno or errno.ENOSPC).lower()} while writing {target}{where}: {removed}; "
                     f"free space on that file system (or write to another one) and run the command again")  # fmt: skip


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    """A scratch directory (``scratch_directory``) removed when the ``with`` block ends."""
    path = scratch_directory()
    try:
        yield path
    finally:
        remove_path(path)
