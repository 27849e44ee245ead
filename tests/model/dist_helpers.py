"""Multi-process test helpers: run a function on N local CPU processes joined by torch.distributed (gloo).

Usage from a test module (pytest runs with ``--import-mode=importlib``, so put this directory on ``sys.path``)::

    sys.path.insert(0, str(Path(__file__).parent))
    from dist_helpers import run_distributed

    def _tp2_logits(rank: int, world_size: int, seed: int) -> torch.Tensor:  # module level, not nested
        from neva_tools.model.parallel import init_distributed
        init_distributed(tp=2, seed=seed)  # reads RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set by run_distributed
        ...
        return logits

    results = run_distributed(_tp2_logits, 2, 1234)  # [rank 0's return value, rank 1's]

How it works: each rank is a process forked from a ``multiprocessing`` fork server that imported torch,
megatron-core, Lightning and open_clip once (:data:`_PRELOAD`; those imports cost every fresh rank seconds, about
half the suite's time), then given its own session, output file and environment as a fresh process would have
them; ``NEVA_TEST_NO_FORKSERVER=1`` makes each rank a fresh ``python dist_helpers.py <job> <rank>`` process instead.
Either way a rank is not a fork of pytest, and has torchrun's variables set (``MASTER_ADDR=127.0.0.1``, a free
``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``). The child loads ``fn``'s source file by path and looks
``fn`` up by its qualified name, so ``fn`` must be defined at module level; ``args`` and return values travel by
pickle, so use plain types and tensors (not classes defined in the test file). A failing rank makes
``run_distributed`` raise ``DistributedRunError`` with that rank's traceback and output; the other ranks are then
stopped. A port clash is retried with a new port.

For single-process tests, ``in_process_distributed()`` gives this process a world-size-1 megatron parallel state
(no port, launcher variables hidden) and tears it down afterwards; use it in a module-scoped fixture.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import inspect
import multiprocessing
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

_PORT_CLASH = ("EADDRINUSE", "address already in use")
#: Imported once by the fork server the ranks are forked from (what every rank imports; seconds each, see below).
_PRELOAD = (
    "torch",
    "torch.distributed",
    "pytorch_lightning",
    "megatron.core",
    "megatron.core.optimizer",
    "megatron.core.models.multimodal.llava_model",
    "megatron.core.dist_checkpointing",
    "open_clip",
)
_FORKSERVER: Any = None
_GRACE_SECONDS = 10.0  # how long the other ranks get to finish after one rank fails


class DistributedRunError(RuntimeError):
    """A rank of ``run_distributed`` failed or timed out; the message holds its traceback and output."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 180.0,
    env: dict[str, str] | None = None,
    port_attempts: int = 3,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` local processes; return each rank's result in order.

    ``timeout`` bounds the whole run (seconds); ``env`` adds environment variables for the children.
    """
    qualname = getattr(fn, "__qualname__", "")
    if not qualname or "<" in qualname:
        raise ValueError(f"run_distributed needs a module-level function, got {fn!r}")
    source = Path(inspect.getsourcefile(fn) or "").resolve()
    if not source.is_file():
        raise ValueError(f"cannot find the source file of {fn!r}")

    with tempfile.TemporaryDirectory(prefix="neva-dist-") as tmp:
        workdir = Path(tmp)
        job = workdir / "job.pkl"
        job.write_bytes(pickle.dumps({"source": str(source), "qualname": qualname, "args": args, "path": sys.path}))
        for attempt in range(1, port_attempts + 1):
            failure = _launch(job, workdir, world_size, timeout, env or {})
            if failure is None:
                return [pickle.loads((workdir / f"result_{rank}.pkl").read_bytes()) for rank in range(world_size)]
            if attempt < port_attempts and any(clash in failure.lower() for clash in map(str.lower, _PORT_CLASH)):
                continue
            raise DistributedRunError(failure)
    raise AssertionError("unreachable")


_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def in_process_distributed(tp: int = 1, seed: int = 1234) -> Iterator[None]:
    """Megatron parallel state for this one process (world size 1, no port), torn down on exit.

    Launcher variables (torchrun's, SLURM's) are hidden meanwhile, so a test run inside a SLURM job stays single.
    """
    from neva_tools.model.parallel import destroy_distributed, init_distributed

    hidden = {k: os.environ.pop(k) for k in list(os.environ) if k in _LAUNCHER_VARS or k.startswith("SLURM_")}
    try:
        init_distributed(tp=tp, seed=seed)
        yield
    finally:
        destroy_distributed()
        os.environ.update(hidden)


def _child_env(rank: int, world_size: int, port: int, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world_size)))
    env.update(extra)
    return env


def _launch(job: Path, workdir: Path, world_size: int, timeout: float, extra_env: dict[str, str]) -> str | None:
    """Run one attempt; return None on success, else a report of the first failing rank."""
    port = free_port()
    for pattern in ("result_*", "error_*"):
        for stale in workdir.glob(pattern):
            stale.unlink()
    logs = [workdir / f"log_{rank}.txt" for rank in range(world_size)]
    procs: list[_Rank] = []
    try:
        for rank in range(world_size):
            procs.append(_start_rank(job, rank, logs[rank], _child_env(rank, world_size, port, extra_env)))
        deadline = time.monotonic() + timeout
        failed_at: float | None = None
        while None in (codes := [p.poll() for p in procs]):  # every rank polled (``any`` would stop at the first)
            now = time.monotonic()
            if failed_at is None and any(code not in (None, 0) for code in codes):
                failed_at = now
            if now > deadline or (failed_at is not None and now - failed_at > _GRACE_SECONDS):
                break
            time.sleep(0.05)
    finally:
        for proc in procs:
            proc.stop()

    codes = [p.poll() for p in procs]  # stopped: each has its status
    if all(code == 0 for code in codes):
        return None
    # Report a rank that raised (it has an error file) before ranks that were merely stopped.
    order = sorted(range(world_size), key=lambda r: (not (workdir / f"error_{r}.txt").exists(), codes[r] in (0, None)))
    rank = order[0]
    error_file = workdir / f"error_{rank}.txt"
    cause = error_file.read_text() if error_file.exists() else f"no Python traceback (timeout {timeout:.0f} s?)"
    output = logs[rank].read_text(errors="replace")[-4000:] if logs[rank].exists() else ""
    return (
        f"rank {rank} of {world_size} failed (exit codes {codes}, MASTER_PORT {port}):\n{cause}\n"
        f"--- rank {rank} output (tail) ---\n{output}"
    )


class _Rank:
    """One rank's process: forked from the fork server (``multiprocessing.Process``) or a plain ``Popen``."""

    def __init__(self, proc: Any) -> None:
        self.proc = proc

    def poll(self) -> int | None:
        """The exit status, None while it runs (a signal's as its negative number)."""
        return self.proc.poll() if isinstance(self.proc, subprocess.Popen) else self.proc.exitcode

    def stop(self) -> None:
        """Kill the rank and its process group (its own session) if it is still running; wait for it."""
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.proc.pid, signal.SIGKILL)  # killed before its setsid
        if isinstance(self.proc, subprocess.Popen):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        else:
            self.proc.join(timeout=10)


def _forkserver() -> Any:
    """The ``multiprocessing`` context whose server process imported :data:`_PRELOAD` once; ``None`` where there
    is no fork server (not POSIX) or ``NEVA_TEST_NO_FORKSERVER`` is set."""
    global _FORKSERVER
    if _FORKSERVER is None:
        if os.environ.get("NEVA_TEST_NO_FORKSERVER") or "forkserver" not in multiprocessing.get_all_start_methods():
            _FORKSERVER = False
        else:
            _FORKSERVER = multiprocessing.get_context("forkserver")
            _FORKSERVER.set_forkserver_preload(list(_PRELOAD))
    return _FORKSERVER or None


def _start_rank(job: Path, rank: int, log: Path, env: dict[str, str]) -> _Rank:
    """Start one rank: forked from the fork server (the imports of :data:`_PRELOAD` already done: a rank's start
    costs a fork, not seconds of imports), else a fresh ``python dist_helpers.py JOB RANK``."""
    ctx = _forkserver()
    if ctx is not None:
        proc = ctx.Process(target=_forked_rank, args=(str(job), rank, str(log), env), daemon=False)
        proc.start()
        return _Rank(proc)
    with open(log, "wb") as out:
        return _Rank(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(job), str(rank)], env=env,
                                      stdout=out, stderr=subprocess.STDOUT, start_new_session=True))  # fmt: skip


def _forked_rank(job_path: str, rank: int, log: str, env: dict[str, str]) -> None:
    """A forked rank: its own session, output and environment as a fresh process would have them, then
    :func:`_child_main`; exit handlers run and the process exits with its status."""
    os.setsid()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.clear()
    os.environ.update(env)
    import torch

    torch.set_num_threads(int(env["OMP_NUM_THREADS"]))  # read from the environment at import time otherwise
    code = 1
    try:
        code = _child_main(job_path, rank)
    finally:
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


@contextlib.contextmanager
def _atomic_write(path: Path) -> Iterator[Any]:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as handle:
        yield handle
    tmp.replace(path)


def _child_main(job_path: str, rank: int) -> int:
    """Entry point of one rank: load ``fn`` by file and name, run it, write its result or traceback."""
    workdir = Path(job_path).parent
    try:
        job = pickle.loads(Path(job_path).read_bytes())
        sys.path.extend(p for p in job["path"] if p not in sys.path)
        source = Path(job["source"])
        sys.path.insert(0, str(source.parent))
        spec = importlib.util.spec_from_file_location(f"_neva_dist_{source.stem}", source)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        fn: Any = module
        for part in job["qualname"].split("."):
            fn = getattr(fn, part)
        result = fn(rank, int(os.environ["WORLD_SIZE"]), *job["args"])
        with _atomic_write(workdir / f"result_{rank}.pkl") as handle:
            pickle.dump(result, handle)
        # Leave together: rank 0 hosts the TCP store the others may still be using.
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    except BaseException:
        (workdir / f"error_{rank}.txt").write_text(traceback.format_exc())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1], int(sys.argv[2])))
