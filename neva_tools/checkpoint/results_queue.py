"""megatron-core's checkpoint writer, with a results queue whose server process dies with ours.

``dist_checkpointing.save`` (the ``torch_dist`` strategy's ``FileSystemWriterAsync``) collects the write results
through a queue of a ``multiprocessing`` manager it spawns once per process and keeps
(``filesystem_async._get_write_results_queue``). A process killed with SIGKILL (a rank when its launcher is
killed, a command stopped with ``kill -9``) cannot shut that manager down, and it used to stay behind for good,
one per rank. :func:`adopt_results_queue` starts the same queue first, from a manager whose server asks to be
killed when its parent dies (:func:`~neva_tools.utils.parent_death.die_with_parent`); megatron then uses it.
"""

from __future__ import annotations

import multiprocessing
import os
from multiprocessing.managers import SyncManager
from typing import Any

from neva_tools.utils.parent_death import die_with_parent

_manager: SyncManager | None = None


def adopt_results_queue() -> Any:
    """Give megatron-core's checkpoint writer its results queue (once per process); returns the queue."""
    global _manager
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))  # the context megatron uses
        manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
        filesystem_async._results_queue = manager.Queue()
        _manager = manager  # the queue's proxy keeps it too; this names the process for tests and debugging
    return filesystem_async._results_queue


def server_pid() -> int | None:
    """The pid of the manager :func:`adopt_results_queue` started in this process, if it did."""
    return None if _manager is None or _manager._process is None else _manager._process.pid
