"""Keeping a training job supervised: ranks die with their launcher, and one job at a time writes a run directory.

**Ranks die with their launcher.** torchrun starts each worker with ``start_new_session=True`` (its own session and
process group), so neither ``kill -9 <torchrun>`` nor ``kill -9 -<torchrun's process group>`` reaches the ranks: they
are reparented to init and go on training, checkpointing and writing the final ``.nemo`` unsupervised.
``die_with_launcher()`` (called first thing by ``neva train`` in a launched rank) asks Linux to send SIGKILL to the
rank when its parent dies (``prctl(PR_SET_PDEATHSIG)``; torchrun spawns its workers from its main thread, so the
signal comes when the torchrun process ends), then checks that the parent did not already die before that: the
parent pid must not have changed, and ``NEVA_LAUNCHER_PID`` (exported by ``scripts/train.sh``: torchrun's pid, as
it ``exec``s torchrun) must still be an ancestor. Elsewhere than Linux a watchdog thread polls ``os.getppid()``
every second instead. Under srun the parent is slurmstepd, which stops the tasks itself; the signal is harmless.

**One job per run directory.** ``claim_run_dir(run_dir)`` makes global rank 0 take an exclusive ``flock`` on
``run_dir/.lock`` for the whole job, with the holder's pid, host and start time written in it; a second job on the
same directory stops with a ``NevaError`` naming them, on every rank (rank 0's verdict is broadcast right after
the process group is created, so no rank waits for a peer that has stopped). The kernel drops the ``flock`` when
its holder dies, however it dies, so a ``.lock`` file left by a killed job does not block the next one (resume
keeps working); a job that ends normally removes the file. Nothing reads ``.lock`` but this module: exports look
for ``*.nemo`` and ``checkpoints/step=N`` only.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from neva_tools.errors import NevaError
from neva_tools.utils.parent_death import set_pdeathsig

logger = logging.getLogger(__name__)

LAUNCHER_PID_VAR = "NEVA_LAUNCHER_PID"  # set by scripts/train.sh: the pid of the torchrun it exec's
LOCK_NAME = ".lock"
_armed: str | None = None  # how this process is tied to its launcher, once it is


# -- ranks die with their launcher ----------------------------------------------------------------------------


def launched_worker() -> bool:
    """Whether a launcher (torchrun or another ``env://`` launcher, srun) started this process as one rank."""
    env = os.environ
    return ("TORCHELASTIC_RUN_ID" in env or ("RANK" in env and "WORLD_SIZE" in env)
            or ("SLURM_PROCID" in env and "SLURM_NTASKS" in env))  # fmt: skip


def _parent_of(pid: int) -> int | None:
    """The parent pid of ``pid`` from ``/proc`` (None if unknown)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ...
    return int(fields[1]) if len(fields) > 1 else None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        stat = ""
    if stat:
        return stat[stat.rfind(")") + 2 :][:1] not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_ancestor(pid: int) -> bool:
    """Whether ``pid`` is this process's parent, grandparent, … (liveness where ``/proc`` is missing)."""
    current = os.getppid()
    if current == pid:
        return True
    if not Path("/proc/self/stat").exists():
        return pid_alive(pid)
    for _ in range(64):
        parent = _parent_of(current)
        if parent is None or parent == current:
            return False
        if parent == pid:
            return True
        if parent <= 1:
            return False
        current = parent
    return False


def _die(sig: int, why: str) -> None:
    """End this process now with ``sig`` (as the parent-death signal would), no clean-up, no more writes."""
    with contextlib.suppress(Exception):
        logger.error("%s; this rank stops", why)
        for handler in logging.getLogger().handlers:
            handler.flush()
    os.kill(os.getpid(), sig)
    time.sleep(1.0)  # a handled signal: make sure anyway
    os._exit(128 + int(sig))


def _watch_parent(parent: int, sig: int, interval: float) -> None:
    while True:
        time.sleep(interval)
        if os.getppid() != parent:
            _die(sig, f"the launcher (pid {parent}) has gone")


def die_with_launcher(sig: int = signal.SIGKILL, *, use_prctl: bool = True, interval: float = 1.0) -> str | None:
    """Tie this rank's life to its launcher's (see the module docstring); return how, or None when not launched.

    ``use_prctl=False`` uses the watchdog thread (polling the parent pid every ``interval`` seconds) even on Linux.
    Calling it again does nothing. A process whose launcher has already gone ends at once.
    """
    global _armed
    if _armed is not None or not launched_worker():
        return _armed
    parent = os.getppid()
    launcher = os.environ.get(LAUNCHER_PID_VAR, "")
    if launcher.isdigit() and not _is_ancestor(int(launcher)):
        _die(sig, f"the launcher (pid {launcher}) ended before this rank started")
    how = "prctl" if use_prctl and set_pdeathsig(sig) else None
    if how is None:
        threading.Thread(target=_watch_parent, args=(parent, sig, interval), name="neva-launcher-watchdog",
                         daemon=True).start()  # fmt: skip
        how = "watchdog"
    if os.getppid() != parent:  # the parent died before the signal was armed: it will never come
        _die(sig, f"the launcher (pid {parent}) has gone")
    _armed = how
    logger.debug("pid %d dies with its launcher (pid %d) by %s, signal %s", os.getpid(), parent,
                 "prctl(PR_SET_PDEATHSIG)" if how == "prctl" else f"a watchdog thread ({interval:g} s)",
                 signal.Signals(sig).name)  # fmt: skip
    return how


# -- one job per run directory --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LockHolder:
    """The job that holds a run directory's lock, as written in its lock file."""

    pid: int | None
    host: str
    started: str

    def describe(self) -> str:
        if self.pid is None:
            return "a job that has not written its pid yet"
        return f"pid {self.pid} on host {self.host}, started {self.started}"


class RunDirLocked(NevaError):
    """Another job holds the run directory's lock."""

    def __init__(self, run_dir: Path, holder: LockHolder) -> None:
        self.run_dir, self.holder = run_dir, holder
        stop = f"stop it (kill {holder.pid} on {holder.host})" if holder.pid is not None else "stop it"
        super().__init__(
            f"run directory {run_dir} is in use by another training job: {holder.describe()} (lock file "
            f"{run_dir / LOCK_NAME}). Wait for that job to finish, {stop} and run again (exp_manager."
            "resume_if_exists continues from its last checkpoint), or choose another name= or exp_manager.exp_dir="
        )


def _read_holder(fd: int) -> LockHolder:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return LockHolder(int(info["pid"]), str(info.get("host", "?")), str(info.get("started", "?")))
    except (OSError, ValueError, KeyError, TypeError):
        return LockHolder(None, "?", "?")


class RunDirLock:
    """An exclusive ``flock`` on ``run_dir/.lock`` holding this process's pid, host and start time."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None
        self._created: list[Path] = []  # directories this lock created (removed again if left empty)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunDirLock:
        """Take the lock, or raise ``RunDirLocked`` naming the holder (a file nobody holds is taken over)."""
        import fcntl

        for _ in range(20):
            missing = [d for d in (self.run_dir, *self.run_dir.parents) if not d.exists()]
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._created = self._created or missing
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            except FileNotFoundError:  # an empty run directory removed by a job that just ended: create it again
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                if holder.pid is None:  # the holder has just taken it and not written yet
                    time.sleep(0.1)
                    holder = _read_holder(fd)
                os.close(fd)
                self._created = []  # the holder's directories
                raise RunDirLocked(self.run_dir, holder) from None
            except OSError as exc:
                os.close(fd)
                self._created = []
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    logger.warning("cannot lock %s (%s): nothing stops a second job on this run directory",
                                   self.path, exc.strerror)  # fmt: skip
                    return self
                raise
            try:  # a holder that ended meanwhile removed the file we opened: lock the path's file instead
                current = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        else:
            raise NevaError(f"could not lock {self.path}: it keeps being replaced")
        started = datetime.now().astimezone().isoformat(timespec="seconds")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": started, "command": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        logger.debug("locked run directory %s (%s)", self.run_dir, self.path)
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock (a no-op when not held); a run directory the lock created and
        the job left empty (it stopped before writing anything) goes too."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(FileNotFoundError):
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    os.unlink(self.path)  # while still locked: a job that opened it retries on a new file
        finally:
            os.close(fd)  # drops the flock
        self._remove_created()

    def _remove_created(self) -> None:
        created, self._created = self._created, []
        for directory in created:  # the run directory first, then the parents it needed
            try:
                directory.rmdir()
            except OSError:  # not empty (or gone): kept
                return

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _rank0_verdict(refusal: str | None, local_rank: int) -> str | None:
    """Rank 0's ``refusal`` on every rank (a broadcast over the default process group, created if needed)."""
    import torch

    from neva_tools.model.parallel import init_process_group

    init_process_group()
    device = torch.device("cuda", local_rank) if torch.distributed.get_backend() == "nccl" else None
    message = [refusal]
    torch.distributed.broadcast_object_list(message, src=0, device=device)
    return message[0]


@contextlib.contextmanager
def claim_run_dir(run_dir: str | Path) -> Iterator[RunDirLock | None]:
    """Hold ``run_dir``'s lock on global rank 0 while the block runs; every rank raises if another job holds it.

    Yields the lock on rank 0 (None elsewhere). Collective when the job has several processes.
    """
    from neva_tools.model.parallel import launch_env

    run_dir = Path(run_dir)
    env = launch_env()
    lock, refused = None, None
    if env.rank == 0:
        try:
            lock = RunDirLock(run_dir).acquire()
        except RunDirLocked as exc:
            refused = exc
    try:
        if env.world_size > 1:
            verdict = _rank0_verdict(str(refused) if refused else None, env.local_rank)
            if verdict is not None and refused is None:
                refused = NevaError(f"run directory {run_dir} is in use by another training job (global rank 0 "
                                    "names it); this rank stops too")  # fmt: skip
        if refused is not None:
            raise refused
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
