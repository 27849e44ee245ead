"""Ctrl-C in the ``neva`` command and the drop-in scripts: one line, exit status 130 (see ``neva_tools.cli.boundary``).

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
import os
import signal
import sys
import threading
from typing import Any

INTERRUPTED = 130  #: exit status after Ctrl-C (128 + SIGINT)
INTERRUPT_AT_VAR = "NEVA_TEST_INTERRUPT_AT"

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


def command_ended(console: bool) -> None:
    """The command returned or raised: in the ``console`` process an interrupt from now on lets the exit finish."""
    _state["exiting"] = console
