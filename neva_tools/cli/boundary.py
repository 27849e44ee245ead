"""The error boundary of the ``neva`` command: how each way a command can end is told, and its exit status.

============================================  =========================================================  ======
what ends the command                         what is printed (by one process of a multi-process job)    status
============================================  =========================================================  ======
``NevaError`` (the user's input)              ``neva: error: MESSAGE``                                    2
``OSError`` naming a file, or about space     ``neva: error: cannot write FILE: No space left on device   2
                                              — free space there ... or write the output elsewhere``
a file that is not UTF-8/JSON/YAML, or        ``neva: error: cannot read FILE: not valid JSON (line 3,    2
nested too deep                               column 5: ...) — fix the file``
Ctrl-C (SIGINT), wherever it lands            ``neva: interrupted``                                       130
anything else: a bug                          Python's traceback, to be reported                          1
============================================  =========================================================  ======

Readers and writers that know their file raise ``NevaError`` themselves; this is the net under them. A file the
exception does not name is looked for in the traceback (the open file or the ``path`` of the frame that failed).

Ctrl-C: Python raises ``KeyboardInterrupt`` wherever the main thread is, and that can be inside an import (torch
takes seconds to import), a library that wraps it in an exception of its own (torch's ``CheckpointException``),
a finalizer, or the interpreter's exit. So: the handler is installed before the subcommands are imported (an
interrupt there exits at once); once an interrupt arrived, whatever exception ends the command is reported as the
interrupt, and worker threads and finalizers failing in its wake print nothing; an interrupt after the command ended
(joining threads, atexit handlers) lets the exit finish (it stops worker processes) with status 130, and a second
one exits at once. Ctrl-C reaches the whole process group: worker processes spawned by ``multiprocessing`` (they
import this module with their parent's main module) exit without a word, and processes a library forks (megatron's
checkpoint writers) ignore it; their parent stops them and tells the user. Under ``nohup`` (SIGINT ignored) nothing
is installed.

``$NEVA_TEST_INTERRUPT_AT`` (tests only) sends the process SIGINT at a chosen point, not at a time:
``import:MODULE`` (when MODULE starts being imported), ``call:MODULE:FUNCTION[:N]`` (at the Nth call of a function,
in any thread or forked process) or ``exit`` (in an atexit handler, after the command ended); with ``@group`` appended
the signal goes to the whole process group, as Ctrl-C in a terminal sends it; with ``@worker`` the point is armed in
the worker processes ``multiprocessing`` spawns instead of the main one.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import io
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

INTERRUPTED = 130  #: exit status after Ctrl-C (128 + SIGINT)
INTERRUPT_AT_VAR = "NEVA_TEST_INTERRUPT_AT"
#: argparse destinations naming what a command writes (``neva``'s, then the drop-in scripts' NeMo/Megatron names)
OUTPUT_ARGS = ("output", "output_prefix", "predictions", "output_path", "output_file", "out_file", "target_file")

_state = {"interrupts": 0, "exiting": False, "reported": False, "pid": 0}
_original_hooks: dict[str, Any] = {}

# -- Ctrl-C ---------------------------------------------------------------------------------------------------------


def _exit_now() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            stream.flush()
    os._exit(INTERRUPTED)


def report_interrupt() -> None:
    """Print ``neva: interrupted`` once (once per job: ``first_to_report``)."""
    if _state["reported"]:
        return
    _state["reported"] = True
    log = sys.modules.get("neva_tools.utils.log")
    if log is None or log.first_to_report("interrupt", wait_s=0):
        print("neva: interrupted", file=sys.stderr, flush=True)


def interrupted() -> bool:
    """Whether SIGINT arrived since the command started."""
    return _state["interrupts"] > 0


def _on_sigint(signum: int, frame: Any) -> None:
    if os.getpid() != _state["pid"]:  # forked by a library (megatron's checkpoint writers): its parent stops it
        return
    _state["interrupts"] += 1
    if not _state["exiting"]:
        raise KeyboardInterrupt
    report_interrupt()  # the command is over: the exit goes on (it stops worker processes) and ends with 130 ...
    if _state["interrupts"] > 1:  # ... unless Ctrl-C is pressed again
        _exit_now()


@atexit.register  # registered before the libraries' handlers, so run after them: the last step of the exit
def _last_at_exit() -> None:
    """After an interrupt: exit status 130. Else the interpreter's teardown follows, where Python restores the default
    SIGINT action (a Ctrl-C there would kill the process without a word): the finished command ignores it."""
    if not _state["exiting"]:
        return
    if interrupted():
        _exit_now()
    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _thread_hook(hook_args: Any) -> None:
    """Worker threads failing after an interrupt (their files closed, their process group gone) print nothing."""
    if interrupted() or issubclass(hook_args.exc_type, KeyboardInterrupt):
        return
    _original_hooks["thread"](hook_args)


def _unraisable_hook(unraisable: Any) -> None:
    """Finalizers and atexit handlers interrupted, or failing after an interrupt, print nothing."""
    if interrupted() or isinstance(unraisable.exc_value, KeyboardInterrupt):
        return
    _original_hooks["unraisable"](unraisable)


def _worker_sigint(signum: int, frame: Any) -> None:
    os._exit(INTERRUPTED)  # a worker process (Ctrl-C reaches the whole process group): its parent tells the user


def _worker_process() -> bool:
    """A process ``multiprocessing`` started (also while a spawned one imports its parent's main module)."""
    mp = sys.modules.get("multiprocessing")
    if mp is None:
        return False
    preparing = getattr(mp.current_process(), "_inheriting", False)  # spawn: importing the parent's __main__
    return preparing or mp.parent_process() is not None


def catch_interrupts() -> None:
    """Install the SIGINT handler (it raises ``KeyboardInterrupt`` as Python's does, until the command ended) and the
    quiet thread/finalizer hooks. Nothing in another thread, nor when SIGINT is ignored; a ``multiprocessing`` worker
    exits on SIGINT without a word."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        return
    if _worker_process():
        signal.signal(signal.SIGINT, _worker_sigint)
        return
    _state["pid"] = os.getpid()
    signal.signal(signal.SIGINT, _on_sigint)
    if "thread" not in _original_hooks:
        _original_hooks["thread"], threading.excepthook = threading.excepthook, _thread_hook
        _original_hooks["unraisable"], sys.unraisablehook = sys.unraisablehook, _unraisable_hook


def guard_startup() -> None:
    """For scripts: arm the test hook's import points and install the Ctrl-C handler before the heavy imports (wrap
    those in ``try: ... except KeyboardInterrupt: interrupted_while_starting()``, as ``neva_tools.cli.main`` does)."""
    arm_import_interrupt()
    catch_interrupts()


def interrupted_while_starting() -> None:
    """An interrupt while the subcommands were being imported: say so and exit (nothing was written yet)."""
    report_interrupt()
    _exit_now()


def command_started() -> None:
    """Forget interrupts of an earlier command (in-process calls) and arm the test hook's ``call``/``exit`` points."""
    _state.update(interrupts=0, exiting=False, reported=False)
    _arm_test_interrupt(("call", "exit"))


# -- the test hook: SIGINT at a chosen point --------------------------------------------------------------------------


def _send_sigint() -> None:
    if "@group" in os.environ.get(INTERRUPT_AT_VAR, ""):  # as Ctrl-C does: the whole process group
        os.killpg(os.getpgrp(), signal.SIGINT)
    else:
        os.kill(os.getpid(), signal.SIGINT)


class _InterruptOnImport:
    """A meta path finder sending SIGINT when ``module`` starts being imported (then it steps aside)."""

    def __init__(self, module: str) -> None:
        self.module = module

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == self.module:
            sys.meta_path.remove(self)
            _send_sigint()
            threading.Event().wait(0.01)  # the handler runs here, inside the import
        return None


def _arm_test_interrupt(kinds: tuple[str, ...]) -> None:
    spec, *flags = os.environ.get(INTERRUPT_AT_VAR, "").split("@")
    kind, _, rest = spec.partition(":")
    if not spec or kind not in kinds or ("worker" in flags) != _worker_process():
        return
    if kind == "import":
        sys.meta_path.insert(0, _InterruptOnImport(rest))
    elif kind == "exit":
        atexit.register(lambda: (_send_sigint(), threading.Event().wait(1.0)))
    else:
        module, _, function = rest.partition(":")
        function, _, nth = function.partition(":")
        left = [int(nth or 1)]

        def profile(frame: Any, event: str, arg: Any) -> None:
            if (event == "call" and left[0] > 0 and frame.f_code.co_name == function
                    and frame.f_globals.get("__name__") == module):  # fmt: skip
                left[0] -= 1
                if left[0] == 0:
                    sys.setprofile(None)
                    _send_sigint()

        threading.setprofile(profile)
        sys.setprofile(profile)


def arm_import_interrupt() -> None:
    """Arm the test hook's ``import`` point (before the subcommands are imported)."""
    _arm_test_interrupt(("import",))


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


def run(command: Callable[[], Any], args: Callable[[], Any] = lambda: None, *, console: bool = False,
        prefix: str = "neva: error: ") -> int:  # fmt: skip
    """Run ``command`` inside the boundary; its exit status (``args()``: the parsed arguments, once known). In the
    ``console`` process the command is over as soon as it returns or raises: an interrupt after that lets the
    interpreter's exit finish, with exit status 130. Our errors are printed after ``prefix``."""
    try:
        status = int(command() or 0)
        _state["exiting"] = console
        return status
    except SystemExit:
        _state["exiting"] = console
        raise
    except BaseException as exc:
        _state["exiting"] = console
        if interrupted() or isinstance(exc, KeyboardInterrupt):
            report_interrupt()
            return INTERRUPTED
        if isinstance(exc, BrokenPipeError) and exc.filename is None:  # `neva ... | head`: the reader went away
            with open(os.devnull, "w") as null:
                os.dup2(null.fileno(), sys.stdout.fileno())
            return 141
        message = explain(exc, args())
        if message is None:
            raise
        from neva_tools.utils.log import first_to_report

        if first_to_report():  # once per job, not once per rank
            print(f"{prefix}{message}", file=sys.stderr)
        return 2


def run_dropin(body: Callable[[], Any], args: Callable[[], Any] = lambda: None) -> int:
    """Run a drop-in script's ``body`` (the scripts taking NeMo's, Megatron-LM's or LLaVA's flags) inside the same
    boundary as ``neva``, with Ctrl-C handling: our errors are printed as ``ERROR: MESSAGE`` (those tools' style),
    exit status 2; Ctrl-C 130; a bug keeps its traceback."""
    catch_interrupts()
    command_started()
    return run(body, args, prefix="ERROR: ")
