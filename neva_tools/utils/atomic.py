"""Atomic outputs: write to a temporary path next to the target, rename when complete.

A failure (exception, Ctrl-C, kill) never leaves a half-written output at the target path. The temporary path
is hidden and names its writer: ``.<name>.tmp-<pid>-<host>-<random>`` (``<host>``: 8 hex digits of the machine's
name and PID namespace). It is removed on every exit Python sees; one that a killed process (SIGKILL, OOM, power
loss) left is removed, with a note, by the next writer of the same output once its pid is gone on this machine
(``remove_stale_temporaries``). Scratch directories (``scratch_directory``) are removed when the process exits.
A full disk while writing is a ``NevaError`` naming the output (``disk_full_error``), the temporary removed.

Every output has a kind (``OutputKind``): a file or a directory, and a recogniser of an earlier output of
that kind. An existing path is replaced (``--overwrite``) only when it is such an earlier output, or an
empty file or directory: never an unrelated file, a directory of something else, a directory where a file
goes or a file where a directory goes. Recognisers read names and headers; only small files (a sentencepiece
model, a JSON object under 8 MiB) are parsed whole.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from neva_tools.errors import NevaError

logger = logging.getLogger(__name__)

#: ``recognise(path)``: None when ``path`` (an existing, non-empty file or directory of the kind's type) is an
#: earlier output of the kind, else the reason it is not one (``"no config.json"``).
Recogniser = Callable[[Path], str | None]


@dataclass(frozen=True)
class OutputKind:
    """What a command writes at its output path: ``name`` (for messages), file or directory, and its recogniser."""

    name: str
    is_dir: bool
    recognise: Recogniser


# --- recognisers -----------------------------------------------------------------------------------------------

_JSON_PARSE_LIMIT = 8 << 20  # larger JSON objects are recognised by their first key
_SENTENCEPIECE_LIMIT = 64 << 20
_FIRST_KEY = re.compile(rb'\s*\{\s*"([^"\\]{1,200})"\s*:')
_MMAP_MAGIC = b"MMIDIDX\x00\x00"  # megatron-core's ``_INDEX_HEADER``


def _any_file(path: Path) -> str | None:
    return None


def _nemo(path: Path) -> str | None:
    """A tar holding ``model_config.yaml`` (headers only: the members' data are skipped)."""
    try:
        with tarfile.open(path, "r:*") as tar:
            if any(member.name.removeprefix("./") == "model_config.yaml" for member in tar):
                return None
    except (tarfile.TarError, OSError, EOFError):
        return "not a tar archive"
    return "a tar archive without model_config.yaml"


def _hf_model(path: Path) -> str | None:
    """``config.json`` and safetensors (or ``pytorch_model.bin``) weights, as ``save_pretrained`` writes them."""
    if not (path / "config.json").is_file():
        return "no config.json"
    if next(path.glob("*.safetensors"), None) is None and not (path / "pytorch_model.bin").is_file():
        return "config.json but no *.safetensors weights"
    return None


def _hf_tokenizer(path: Path) -> str | None:
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return "neither tokenizer.json nor tokenizer_config.json"
    return None


def _checkpoint_exports(path: Path) -> str | None:
    """Only ``step=N`` directories (and hidden temporaries of ``step=N``), as ``--all-checkpoints`` writes."""
    ours = re.compile(r"\.?step=\d+(\.tmp-.*|\.old-.*)?")
    other = sorted(p.name for p in path.iterdir() if not (ours.fullmatch(p.name) and p.is_dir()))
    if not other:
        return None
    return f"it holds {', '.join(other[:5])}{' …' if len(other) > 5 else ''}, not only step=N directories"


def _sentencepiece(path: Path) -> str | None:
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2

    if path.stat().st_size > _SENTENCEPIECE_LIMIT:
        return "too large for a sentencepiece model"
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except DecodeError:
        return "protobuf parse failed"
    return None if proto.pieces else "a protobuf message with no pieces"


def _mmap_idx(path: Path) -> str | None:
    with open(path, "rb") as fh:
        return None if fh.read(len(_MMAP_MAGIC)) == _MMAP_MAGIC else "no MMIDIDX header"


def _mmap_bin(path: Path) -> str | None:
    """Token data has no header: a ``.bin`` is ours when its ``.idx`` is a megatron index."""
    idx = path.with_suffix(".idx")
    return None if idx.is_file() and _mmap_idx(idx) is None else f"no megatron index {idx.name} beside it"


def json_object(*keys: str) -> Recogniser:
    """A recogniser of a JSON object holding ``keys`` (one above 8 MiB: its first key must be one of them)."""

    def recognise(path: Path) -> str | None:
        with open(path, "rb") as fh:
            head = fh.read(_JSON_PARSE_LIMIT + 1)
        if len(head) > _JSON_PARSE_LIMIT:
            first = _FIRST_KEY.match(head)
            return None if first and first.group(1).decode(errors="replace") in keys else "not such a JSON object"
        try:
            data = json.loads(head)
        except ValueError:
            return "not valid JSON"
        return _missing_keys(data, keys)

    return recognise


def jsonl_rows(*keys: str) -> Recogniser:
    """A recogniser of JSON lines whose first line is an object holding ``keys``."""

    def recognise(path: Path) -> str | None:
        with open(path, "rb") as fh:
            first = fh.readline(1 << 20)
        try:
            data = json.loads(first)
        except ValueError:
            return "its first line is not JSON"
        return _missing_keys(data, keys)

    return recognise


def _missing_keys(data: object, keys: tuple[str, ...]) -> str | None:
    if not isinstance(data, dict):
        return f"JSON {type(data).__name__}, not an object"
    missing = [k for k in keys if k not in data]
    return f"a JSON object without {', '.join(missing)}" if missing else None


# --- the kinds -------------------------------------------------------------------------------------------------

ANY_FILE = OutputKind("a file", False, _any_file)
NEMO_FILE = OutputKind("a .nemo file", False, _nemo)
HF_MODEL_DIR = OutputKind("a Hugging Face model directory", True, _hf_model)
HF_TOKENIZER_DIR = OutputKind("a Hugging Face tokenizer directory", True, _hf_tokenizer)
CHECKPOINT_EXPORTS_DIR = OutputKind("a directory of per-checkpoint exports (step=N)", True, _checkpoint_exports)
SENTENCEPIECE_MODEL = OutputKind("a sentencepiece model", False, _sentencepiece)
MMAP_BIN = OutputKind("a megatron .bin token file", False, _mmap_bin)
MMAP_IDX = OutputKind("a megatron .idx index", False, _mmap_idx)
PACK_PLAN = OutputKind("a packing plan (neva data pack)", False, json_object("max_seq_length", "fill_ratio", "bins"))
EVAL_REPORT = OutputKind("an eval report (neva eval)", False, json_object("model", "data", "records"))
EVAL_PREDICTIONS = OutputKind("eval predictions (neva eval)", False, jsonl_rows("id", "kind", "reference"))
ANSWERS = OutputKind("an answers file (neva generate)", False, jsonl_rows("id", "prompt", "answer"))


# --- checks ----------------------------------------------------------------------------------------------------


def describe(path: Path, limit: int = 10_000) -> str:
    """What is at an existing ``path``: ``a file of 10 bytes``, ``a directory with 1 file`` …"""
    mode = path.lstat().st_mode
    if stat.S_ISLNK(mode):
        return f"a symbolic link to {os.readlink(path)}"
    if stat.S_ISREG(mode):
        size = path.stat().st_size
        return f"a file of {size:,} byte{'s' * (size != 1)}" if size else "an empty file"
    if not stat.S_ISDIR(mode):
        return "a special file (not a regular file or directory)"
    files = 0
    for _, _, names in os.walk(path):
        files += len(names)
        if files > limit:
            return f"a directory with more than {limit:,} files"
    if files:
        return f"a directory with {files:,} file{'s' * (files != 1)}"
    return "a directory with subdirectories only" if any(path.iterdir()) else "an empty directory"


def _is_empty(path: Path) -> bool:
    return path.stat().st_size == 0 if path.is_file() else not any(path.iterdir())


def kind_problem(path: Path, kind: OutputKind) -> str | None:
    """None when an output of ``kind`` may replace what is at ``path`` (nothing or an earlier one), else what it is."""
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_symlink() or not (path.is_file() or path.is_dir()):
        return describe(path)
    if path.is_dir() != kind.is_dir:
        return f"{describe(path)}, not {kind.name}"
    try:
        reason = None if _is_empty(path) else kind.recognise(path)
    except OSError as exc:
        reason = f"unreadable: {exc.strerror or exc}"
    return None if reason is None else f"{describe(path)} that is not {kind.name} ({reason})"


def check_output_kind(path: Path, kind: OutputKind) -> None:
    """Refuse a ``path`` that holds something other than an earlier output of ``kind``."""
    problem = kind_problem(Path(path), kind)
    if problem is not None:
        raise NevaError(f"output {path} is {problem}; --overwrite only replaces an earlier output of this kind: "
                        "choose another path, or remove it yourself if it is no longer needed")  # fmt: skip


def check_output_path(path: Path, overwrite: bool, kind: OutputKind = ANY_FILE) -> None:
    """Refuse an existing output unless ``overwrite`` is set and it is an earlier output of ``kind``."""
    path = Path(path)
    check_output_kind(path, kind)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise NevaError(f"output {path} already exists; pass --overwrite to replace it, or choose another path")


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
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
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


def _remove(path: Path) -> None:
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
        _remove(path)
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
        _remove(path)
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
        if isinstance(current, OSError) and current.errno in _DISK_FULL:
            return current
        text = None if isinstance(current, OSError) else _ERRNO_TEXT.search(str(current))
        if text is not None and int(text[1]) in _DISK_FULL:  # megatron-core's writer processes: "Worker failure: …"
            return OSError(int(text[1]), text[2], text[3])
        rust = None if isinstance(current, OSError) else _RUST_OS_ERROR.search(str(current))
        if rust is not None and int(rust[1]) in _DISK_FULL:
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


# --- writing ---------------------------------------------------------------------------------------------------


def _replace(tmp: Path, target: Path) -> None:
    if target.is_dir() and not target.is_symlink():
        old = make_temp(target, is_dir=True, role="old")
        os.replace(target, old / target.name)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, kind: OutputKind = ANY_FILE, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path (a file path, or a created directory for a directory ``kind``) that becomes ``target``.

    ``target`` is checked (``check_output_path``) on entry and again just before the rename. Temporaries that killed
    writers of ``target`` left are removed first; a full disk is a ``NevaError`` naming ``target``.
    """
    target = Path(target)
    check_output_path(target, overwrite, kind)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    try:
        tmp = make_temp(target, is_dir=kind.is_dir)
    except OSError as exc:
        if exc.errno in _DISK_FULL:
            raise disk_full_error(target, exc, removed="nothing was written") from None
        raise
    try:
        kill_point("atomic")
        yield tmp
        check_output_path(target, overwrite, kind)  # something may have appeared there meanwhile
        _replace(tmp, target)
    except BaseException as exc:
        _remove(tmp)
        full = disk_full(exc)
        if full is not None:
            raise disk_full_error(target, full) from None
        raise
