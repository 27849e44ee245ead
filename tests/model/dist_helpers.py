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

How it works: each rank is a fresh ``python dist_helpers.py <job> <rank>`` process (not fork/spawn of pytest), with
torchrun's variables set (``MASTER_ADDR=127.0.0.1``, a free ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``). The child loads ``fn``'s source file by path and looks ``fn`` up by its qualified name, so ``fn``
must be defined at module level; ``args`` and return values travel by pickle, so use plain types and tensors (not
classes defined in the test file). A failing rank makes ``run_distributed`` raise ``DistributedRunError`` with that
rank's traceback and output; the other ranks are then stopped. A port clash is retried with a new port.

For single-process tests, ``in_process_distributed()`` gives this process a world-size-1 megatron parallel state
(no port, launcher variables hidden) and tears it down afterwards; use it in a module-scoped fixture.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
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
    procs: list[subprocess.Popen[bytes]] = []
    logs = [workdir / f"log_{rank}.txt" for rank in range(world_size)]
    try:
        for rank in range(world_size):
            with open(logs[rank], "wb") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, str(Path(__file__).resolve()), str(job), str(rank)],
                        env=_child_env(rank, world_size, port, extra_env),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        deadline = time.monotonic() + timeout
        failed_at: float | None = None
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
                failed_at = now
            if now > deadline or (failed_at is not None and now - failed_at > _GRACE_SECONDS):
                break
            time.sleep(0.05)
    finally:
        for proc in procs:
            _stop(proc)

    codes = [p.returncode for p in procs]
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


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Kill ``proc`` and its process group (started with ``start_new_session``) if it is still running."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


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
