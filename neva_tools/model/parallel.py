"""Process-group and megatron-core parallel-state set-up for torchrun, SLURM (srun) and a single plain process.

The launcher is read from the environment, first match wins:

* torchrun (or any ``env://`` launcher): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``;
* SLURM ``srun``: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, plus ``MASTER_ADDR``/``MASTER_PORT``
  exported by the job script (e.g. ``export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)``);
  run the program under ``srun``: a plain ``python`` in a multi-task batch script would wait for tasks that never come;
* nothing set: one process, world size 1, with an in-memory store (no port needed).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from neva_tools.errors import NevaError
from neva_tools.model.cpu_compat import apply_cpu_compat, model_parallel_seed

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as told by its launcher."""

    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "torchrun", "slurm" or "single"


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise NevaError(f"environment variable {name} must be an integer, found {value!r}") from None


def launch_env() -> LaunchEnv:
    """Read rank, world size and local rank from torchrun's or SLURM's variables (world size 1 if neither)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0
        return LaunchEnv(_env_int("RANK"), _env_int("WORLD_SIZE"), local_rank, "torchrun")
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        local_rank = _env_int("SLURM_LOCALID") if "SLURM_LOCALID" in os.environ else 0
        return LaunchEnv(_env_int("SLURM_PROCID"), _env_int("SLURM_NTASKS"), local_rank, "slurm")
    return LaunchEnv(0, 1, 0, "single")


def _init_process_group(env: LaunchEnv, backend: str) -> None:
    """Create the default process group for ``env`` (a no-op if one exists)."""
    if torch.distributed.is_initialized():
        found = (torch.distributed.get_rank(), torch.distributed.get_world_size())
        if found != (env.rank, env.world_size):
            logger.warning(
                "reusing the existing process group (rank %d of %d), not the launcher's (rank %d of %d)",
                *found,
                env.rank,
                env.world_size,
            )
        return
    if env.world_size == 1 and not ("MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ):
        store = torch.distributed.HashStore()
        torch.distributed.init_process_group(backend, store=store, rank=0, world_size=1, timeout=DEFAULT_TIMEOUT)
        return
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise NevaError(
            f"{env.launcher} launch with world size {env.world_size} needs {' and '.join(missing)} in the "
            "environment; export MASTER_ADDR (the first node's host name) and MASTER_PORT (a free port) "
            "before srun, or launch with torchrun"
        )
    os.environ.setdefault("RANK", str(env.rank))
    os.environ.setdefault("WORLD_SIZE", str(env.world_size))
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    torch.distributed.init_process_group(
        backend, init_method="env://", rank=env.rank, world_size=env.world_size, timeout=DEFAULT_TIMEOUT
    )


def init_process_group(backend: str | None = None) -> LaunchEnv:
    """Only the default process group of this launch (no megatron state); a no-op if one exists.

    Lightning's strategy and ``init_distributed`` reuse it. ``backend`` defaults to nccl with CUDA, gloo without.
    """
    cuda = torch.cuda.is_available()
    env = launch_env()
    if cuda:
        torch.cuda.set_device(env.local_rank)
    _init_process_group(env, backend or ("nccl" if cuda else "gloo"))
    return env


def init_distributed(tp: int = 1, pp: int = 1, backend: str | None = None, seed: int = 1234,
                     vpp: int | None = None) -> None:  # fmt: skip
    """Initialize torch.distributed and megatron-core's parallel state, and seed the RNGs.

    ``backend`` defaults to nccl with CUDA and gloo without; on CPU the megatron-core CPU patches are applied.
    Calling it again reuses the process group and rebuilds megatron's parallel state with the new ``tp``/``pp``.
    ``vpp``: virtual pipeline stages (interleaved model chunks) per pipeline rank, None for none.
    """
    from megatron.core import parallel_state

    if tp < 1 or pp < 1:
        raise NevaError(f"tensor_model_parallel_size ({tp}) and pipeline_model_parallel_size ({pp}) must be at least 1")
    cuda = torch.cuda.is_available()
    if not cuda:
        apply_cpu_compat()
    backend = backend or ("nccl" if cuda else "gloo")
    env = launch_env()
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else env.world_size
    if world_size % (tp * pp) != 0:
        raise NevaError(
            f"world size ({world_size}) must be divisible by tensor_model_parallel_size × "
            f"pipeline_model_parallel_size ({tp} × {pp} = {tp * pp}); launch a multiple of {tp * pp} processes "
            "or change tensor_model_parallel_size/pipeline_model_parallel_size"
        )
    if cuda:
        torch.cuda.set_device(env.local_rank)
    _init_process_group(env, backend)

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             virtual_pipeline_model_parallel_size=vpp)  # fmt: skip
    model_parallel_seed(seed)
    logger.info(
        "distributed: %s launch, rank %d of %d, backend %s, TP=%d PP=%d DP=%d",
        env.launcher,
        torch.distributed.get_rank(),
        torch.distributed.get_world_size(),
        backend,
        tp,
        pp,
        parallel_state.get_data_parallel_world_size(),
    )


def destroy_distributed() -> None:
    """Tear down megatron's parallel state and the default process group (safe to call when not initialized)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
