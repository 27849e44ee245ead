"""The multi-process test helper: ranks forked from the fork server (the imports done once) behave as fresh
``python dist_helpers.py`` processes do — launcher variables, their own session, thread count, output in the
report, exit status of a rank killed by a signal."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import dist_helpers
from dist_helpers import DistributedRunError, run_distributed


def _facts(rank: int, world_size: int) -> dict[str, Any]:
    import torch

    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "OMP_NUM_THREADS", "NEVA_MARK")
    return {
        "env": {k: os.environ.get(k) for k in names},
        "own_session": os.getsid(0) == os.getpid(),
        "threads": torch.get_num_threads(),
        "rank": rank,
        "world_size": world_size,
    }


def _loud_failure(rank: int, world_size: int) -> None:
    print(f"marker from rank {rank}", flush=True)
    if rank == 1:
        raise ValueError("deliberate")
    time.sleep(60)


def _killed(rank: int, world_size: int) -> None:
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)


@pytest.fixture(params=["forkserver", "fresh"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "fresh":
        monkeypatch.setattr(dist_helpers, "_FORKSERVER", False)
    return request.param


def test_ranks_see_what_a_fresh_process_sees(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEVA_MARK", "set after the fork server started")
    facts = run_distributed(_facts, 2)
    for rank, got in enumerate(facts):
        assert got["env"] == {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
                              "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": got["env"]["OMP_NUM_THREADS"],
                              "NEVA_MARK": "set after the fork server started"}  # fmt: skip
        assert got["threads"] == int(got["env"]["OMP_NUM_THREADS"]) and got["own_session"]
        assert (got["rank"], got["world_size"]) == (rank, 2)


def test_a_failing_rank_reports_its_traceback_and_output(mode: str) -> None:
    start = time.monotonic()
    with pytest.raises(DistributedRunError, match="ValueError: deliberate") as info:
        run_distributed(_loud_failure, 2)
    assert "marker from rank 1" in str(info.value)
    assert time.monotonic() - start < 45  # rank 0 (sleeping 60 s) was stopped after the grace period


def test_a_rank_killed_by_a_signal_is_reported(mode: str) -> None:
    with pytest.raises(DistributedRunError, match=r"of 2 failed \(exit codes \[-9, -9\]"):
        run_distributed(_killed, 2)
