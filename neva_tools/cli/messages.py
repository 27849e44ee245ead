"""The one-line messages of the error boundary (``neva_tools.cli.boundary``): which exceptions are the user's or the
machine's doing, and the file and advice each names."""

from __future__ import annotations

import errno
import io
import os
import re
import sys
from pathlib import Path
from typing import Any

#: argparse destinations naming what a command writes (``neva``'s, then the drop-in scripts' NeMo/Megatron names)
OUTPUT_ARGS = ("output", "output_prefix", "predictions", "output_path", "output_file", "out_file", "target_file")

# -- errors -----------------------------------------------------------------------------------------------------------

_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_WRITING = _SPACE | {errno.EROFS}  #: errors only a write gets
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[a-z]+-\d+-[0-9a-f]+(-[0-9a-f]+)?$")  #: utils.atomic's hidden temporaries
_PATH_LOCALS = ("path", "file", "filename", "fname", "source", "src", "input_path", "config_path")
_DECODERS = ("json", "yaml", "omegaconf", "tomllib", "pickle", "ast", "xml", "csv", "configparser")


_OTHER_ADVICE = {
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "it is a folder where a file is expected: give a file's path",
    errno.ENAMETOOLONG: "the name is too long for the file system: choose a shorter path",
    errno.ELOOP: "too many symbolic links on the path: check the links",
    errno.EIO: "the disk or network file system reported an I/O error: check it (dmesg) and retry",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) and retry",
    errno.ENFILE: "too many open files on this machine: retry later",
}


def _outputs(args: Any) -> list[Path]:
    return [Path(os.path.abspath(str(v))) for name in OUTPUT_ARGS if (v := getattr(args, name, None)) is not None]


def _is_output(path: Path, args: Any) -> bool:
    """``path`` is an output of the command, inside one, a temporary next to one, or a folder on the way to one."""
    for out in _outputs(args):
        beside = path.parent == out.parent and path.name.startswith(f".{out.name}.")
        if path == out or out in path.parents or path in out.parents or beside:
            return True
    return False


def _shown(path: Path) -> Path:
    """A hidden temporary ``.NAME.tmp-PID-…`` as the output it stands for."""
    match = _TEMPORARY.match(path.name)
    return path.with_name(match["name"]) if match else path


def _frames(exc: BaseException) -> list[Any]:
    """The traceback's frames, innermost first."""
    frames, tb = [], exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames[::-1]


def file_in_traceback(exc: BaseException, *, writing: bool) -> str | None:
    """The file the innermost frames were writing (``writing``) or reading: an open file among their locals, else
    an existing file named by a ``path``-like local."""
    standard = {id(s) for s in (sys.stdin, sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__, sys.__stdin__)}
    frames = _frames(exc)
    for frame in frames:
        for value in list(frame.f_locals.values()):
            if isinstance(value, io.IOBase) and id(value) not in standard:
                name, mode = getattr(value, "name", None), str(getattr(value, "mode", "r"))
                if isinstance(name, str) and (not writing or any(c in mode for c in "wax+")):
                    return name
    if writing:
        return None
    for frame in frames:
        for key in _PATH_LOCALS:
            value = frame.f_locals.get(key)
            if isinstance(value, (str, os.PathLike)) and "\x00" not in str(value):
                try:
                    if Path(value).is_file():
                        return str(value)
                except (OSError, ValueError):
                    continue
    return None


def _advice(code: int | None, verb: str, path: Path, args: Any) -> str:
    flag = " (--output)" if any(getattr(args, n, None) is not None for n in OUTPUT_ARGS) else ""
    folder = path.parent
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"free space there (df -h {folder}) or write the output elsewhere{flag}"
    if code == errno.EFBIG:
        return f"the file is too large for that file system: write the output elsewhere{flag}"
    if code == errno.EROFS:
        return f"that file system is read-only: choose an output in a writable folder{flag}"
    if code in (errno.EACCES, errno.EPERM):
        if verb == "read":
            return "make it readable by this user (chmod/chown) or copy it somewhere readable"
        return f"choose an output in a folder you can write to{flag}, or change its permissions"
    if code == errno.ENOENT:
        if not folder.is_dir():
            return f"its folder {folder} does not exist: create it or choose another path"
        if verb == "write":
            return f"{folder} does not take new files: choose an output in a regular folder you can write to{flag}"
        return "check the path"
    return _OTHER_ADVICE.get(code, "check the path and retry")


def os_error_message(exc: OSError, args: Any = None) -> str | None:
    """``cannot write FILE: REASON — what to do``, or None for an error that names no file and is not about the
    disk (a network error, memory): not ours to explain."""
    code = exc.errno
    name = exc.filename2 if exc.filename2 is not None and code in _WRITING else exc.filename
    if name is None:
        if code not in _WRITING and code != errno.EIO:
            return None
        name = file_in_traceback(exc, writing=True) or next((str(p) for p in _outputs(args)), None)
    reason = exc.strerror or (os.strerror(code) if code else str(exc))
    if name is None:
        return f"writing failed: {reason} — {_advice(code, 'write', Path('.'), args)}"
    path = Path(os.path.abspath(os.fsdecode(name)))
    temporary = _TEMPORARY.match(path.name) is not None
    verb = "write" if code in _WRITING or temporary or _is_output(path, args) else "read"
    if verb == "read" and code in (errno.ENOENT, errno.EACCES, errno.EPERM) and not path.exists():
        verb = "open"  # a file being created, or one missing: not known
    return f"cannot {verb} {_quoted(_shown(path))}: {reason} — {_advice(code, verb, path, args)}"


def _quoted(path: Path) -> str:
    text = str(path)
    return text if text.isprintable() else ascii(text)


def decode_error_message(exc: BaseException) -> str | None:
    """What is wrong with an input file that could not be decoded (not UTF-8, JSON, YAML; nested too deep), or None
    when ``exc`` is none of these (or a recursion that is not a decoder's: a bug)."""
    yaml = sys.modules.get("yaml")
    if isinstance(exc, RecursionError):
        modules = {str(f.f_globals.get("__name__", "")).split(".")[0] for f in _frames(exc)}
        found = file_in_traceback(exc, writing=False)
        if found is None and not modules & set(_DECODERS):
            return None
        where = f"cannot read {_quoted(Path(found))}: " if found else ""
        return f"{where}nesting too deep in an input file — flatten its nested lists/mappings"
    if isinstance(exc, UnicodeDecodeError):
        found = file_in_traceback(exc, writing=False)
        bad = exc.object[exc.start : exc.start + 1].hex() if isinstance(exc.object, (bytes, bytearray)) else "?"
        what = f"cannot read {_quoted(Path(found))}: it" if found else "an input file"
        return f"{what} is not {exc.encoding.upper()} text (byte 0x{bad}) — save it as UTF-8"
    import json

    if isinstance(exc, json.JSONDecodeError):
        found = file_in_traceback(exc, writing=False)
        what = f"cannot read {_quoted(Path(found))}: it is" if found else "an input file is"
        return f"{what} not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}) — fix the file"
    if yaml is not None and isinstance(exc, yaml.YAMLError):
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        found = getattr(mark, "name", None)
        if not found or str(found).startswith("<"):
            found = file_in_traceback(exc, writing=False)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = f"cannot read {_quoted(Path(found))}: it is" if found else "an input file is"
        return f"{what} not valid YAML ({at}{problem}) — fix the file"
    return None


_SPACE_TEXT = re.compile(r"\[Errno (28|122)\]|os error (28|122)\b|No space left on device|Disk quota exceeded")
_SHORT_WRITE = re.compile(r"unexpected pos \d+ vs \d+")  #: torch's archive writer after a write cut short


def disk_full_message(exc: BaseException, args: Any = None) -> str | None:
    """A full disk behind ``exc`` (its causes, the failures torch's ``CheckpointException`` collected, or a library's
    text: safetensors' ``os error 28``, torch's archive writer losing bytes), as ``cannot write FILE: …``."""
    seen, todo = set(), [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen or not isinstance(current, BaseException):
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _SPACE:
            return os_error_message(current, args)
        text = str(current)
        match = _SPACE_TEXT.search(text)
        short = _SHORT_WRITE.search(text)
        if match or short:
            code = errno.EDQUOT if "122" in (match[0] if match else "") or "quota" in text else errno.ENOSPC
            name = file_in_traceback(exc, writing=True) or next((str(p) for p in _outputs(args)), None)
            path = Path(os.path.abspath(name)) if name else Path(".")
            what = f"cannot write {_quoted(_shown(path))}" if name else "writing failed"
            reason = os.strerror(code) if match else f"the archive writer lost bytes ({short[0]}), as on a full disk"
            return f"{what}: {reason} — {_advice(code, 'write', path, args)}"
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        todo += [current.__cause__, current.__context__]
    return None


def explain(exc: BaseException, args: Any = None) -> str | None:
    """The one-line message of an exception that is the user's or the machine's doing, or None for a bug."""
    from neva_tools.errors import NevaError

    if isinstance(exc, NevaError):
        return str(exc)
    if isinstance(exc, OSError):
        return os_error_message(exc, args) or disk_full_message(exc, args)
    return decode_error_message(exc) or disk_full_message(exc, args)
