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

Ctrl-C is handled in ``neva_tools.cli.interrupts`` (its docstring tells how), the messages are made in
``neva_tools.cli.messages``; both are re-exported here.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from neva_tools.cli.interrupts import (  # noqa: F401  (re-exported)
    INTERRUPT_AT_VAR,
    INTERRUPTED,
    arm_import_interrupt,
    catch_interrupts,
    command_ended,
    command_started,
    guard_startup,
    interrupted,
    interrupted_while_starting,
    report_interrupt,
)
from neva_tools.cli.messages import (  # noqa: F401  (re-exported)
    OUTPUT_ARGS,
    decode_error_message,
    disk_full_message,
    explain,
    file_in_traceback,
    os_error_message,
)


def run(command: Callable[[], Any], args: Callable[[], Any] = lambda: None, *, console: bool = False,
        prefix: str = "neva: error: ") -> int:  # fmt: skip
    """Run ``command`` inside the boundary; its exit status (``args()``: the parsed arguments, once known). In the
    ``console`` process the command is over as soon as it returns or raises: an interrupt after that lets the
    interpreter's exit finish, with exit status 130. Our errors are printed after ``prefix``."""
    try:
        status = int(command() or 0)
        command_ended(console)
        return status
    except SystemExit:
        command_ended(console)
        raise
    except BaseException as exc:
        command_ended(console)
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
