"""Supervision of a training job: killing ``scripts/train.sh`` (torchrun) takes its ranks with it, and one job at a
time writes a run directory (a second one stops with exit 2 naming the first; a killed job's lock does not block)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from builders import text_pretrain_assets
from dist_helpers import run_distributed

from neva_tools.train import supervision
from neva_tools.train.supervision import LOCK_NAME, RunDirLock, RunDirLocked, pid_alive

ROOT = Path(__file__).resolve().parents[2]
TRAIN_SH = ROOT / "scripts" / "train.sh"
RECIPE = ROOT / "recipes" / "text_pretrain" / "tiny_cpu.yaml"
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_RUN_ID", supervision.LAUNCHER_PID_VAR)  # fmt: skip


def plain_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's variables (a plain process), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS and not k.startswith("SLURM_")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)
    return env


def wait_for(condition: Any, timeout: float, what: str, proc: subprocess.Popen | None = None,
             log: Path | None = None) -> Any:  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


# -- the parent-death helper ----------------------------------------------------------------------------------

PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], start_new_session=True)  # like torchrun
print("child", child.pid, flush=True)
time.sleep(120)
"""
CHILD = """
import time
from neva_tools.train.supervision import die_with_launcher
print("armed", die_with_launcher(use_prctl={prctl}, interval=0.2), flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("prctl", [True, False], ids=["prctl", "watchdog"])
def test_a_rank_dies_with_its_parent(prctl: bool) -> None:
    env = plain_env(RANK="0", WORLD_SIZE="1", NEVA_LAUNCHER_PID=str(os.getpid()))  # the launcher is an ancestor
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD.format(prctl=prctl)], env=env,
                              stdout=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    child = None
    try:
        lines = [parent.stdout.readline().split() for _ in range(2)]
        child = next(int(words[1]) for words in lines if words[0] == "child")
        assert ["armed", "prctl" if prctl else "watchdog"] in lines
        assert pid_alive(child)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        wait_for(lambda: not pid_alive(child), 5, "the child to die with its parent")
    finally:
        kill_all([parent.pid] + ([child] if child else []))
        parent.wait()


def test_a_rank_whose_launcher_is_already_gone_stops_at_once() -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    env = plain_env(RANK="1", WORLD_SIZE="2", NEVA_LAUNCHER_PID=str(gone.pid))
    code = "from neva_tools.train.supervision import die_with_launcher; die_with_launcher(); print('trained on')"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL and "trained on" not in done.stdout
    assert f"launcher (pid {gone.pid}) ended before this rank started" in done.stderr


def test_a_plain_process_is_not_tied_to_its_parent(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (*_LAUNCH_VARS, "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(supervision, "_armed", None)
    assert supervision.die_with_launcher() is None


# -- the run-directory lock -----------------------------------------------------------------------------------


def test_lock_names_its_holder_and_is_removed_on_release(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "job"
    with RunDirLock(run) as lock:
        assert lock.held and (run / LOCK_NAME).is_file()
        info = json.loads((run / LOCK_NAME).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        with pytest.raises(RunDirLocked) as refused:
            RunDirLock(run).acquire()  # another open file: flock refuses it, even in the same process
        message = str(refused.value)
        assert f"pid {os.getpid()} on host {socket.gethostname()}, started {info['started']}" in message
        assert "name=" in message and "exp_manager.exp_dir=" in message
    assert not (run / LOCK_NAME).exists()
    assert not (tmp_path / "runs").exists()  # the directories it created for nothing go too
    with RunDirLock(run):
        (run / "config.yaml").write_text("name: job\n")
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]  # a run that wrote something keeps it


def test_a_stale_lock_file_does_not_block(tmp_path: Path) -> None:
    run = tmp_path / "job"
    run.mkdir()
    (run / LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": "elsewhere", "started": "yesterday"}))
    with RunDirLock(run):
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_the_lock_of_a_killed_job_is_released(tmp_path: Path) -> None:
    code = (f"from neva_tools.train.supervision import RunDirLock; RunDirLock({str(tmp_path)!r}).acquire(); "
            "print('locked', flush=True); import time; time.sleep(120)")  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", code], env=plain_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirLocked, match=f"pid {holder.pid} on host"):
            RunDirLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / LOCK_NAME).exists()  # left behind by the killed job: stale
    RunDirLock(tmp_path).acquire().release()


def test_neva_train_on_a_locked_run_dir_exits_2(tmp_path: Path) -> None:
    with RunDirLock(tmp_path / "runs" / "busy"):
        done = subprocess.run([sys.executable, "-m", "neva_tools", "train", "name=busy",
                               f"exp_manager.exp_dir={tmp_path / 'runs'}"], env=plain_env(), capture_output=True,
                              text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "neva: error: run directory" in done.stderr and "Traceback" not in done.stderr
    assert f"pid {os.getpid()} on host {socket.gethostname()}, started" in done.stderr
    assert not (tmp_path / "runs" / "busy" / "config.yaml").exists()  # nothing written into the busy run


def test_neva_train_refuses_an_unrelated_file_at_the_final_nemo_path_before_training(tmp_path: Path) -> None:
    final = tmp_path / "runs" / "job" / "job.nemo"
    final.parent.mkdir(parents=True)
    final.write_text("important")
    done = subprocess.run([sys.executable, "-m", "neva_tools", "train", "name=job",
                           f"exp_manager.exp_dir={tmp_path / 'runs'}"], env=plain_env(), capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and f"output {final} is a file of 9 bytes that is not a .nemo file" in done.stderr
    assert final.read_text() == "important" and not (final.parent / "config.yaml").exists()


def claim_job(rank: int, world_size: int, run_dir: str) -> tuple[str, Any]:
    """``claim_run_dir`` on every rank: ("held", rank 0 holds the lock) or ("refused", the message)."""
    from neva_tools.errors import NevaError
    from neva_tools.train.supervision import claim_run_dir

    try:
        with claim_run_dir(run_dir) as lock:
            return "held", lock is not None and lock.held
    except NevaError as exc:
        return "refused", str(exc)


def test_every_rank_stops_when_rank_0_finds_the_run_dir_locked(tmp_path: Path) -> None:
    with RunDirLock(tmp_path):
        refused = run_distributed(claim_job, 2, str(tmp_path), timeout=120)
    assert [r[0] for r in refused] == ["refused", "refused"]
    assert f"pid {os.getpid()} on host" in refused[0][1] and "global rank 0" in refused[1][1]
    assert run_distributed(claim_job, 2, str(tmp_path), timeout=120) == [("held", True), ("held", False)]
    assert not (tmp_path / LOCK_NAME).exists()


# -- killing scripts/train.sh ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The smallest text-pretraining job: a 1-layer LLaMA .nemo (hidden 32) and an mmap caption corpus."""
    return text_pretrain_assets(tmp_path_factory.mktemp("launcher"), hidden=32, intermediate=64, layers=1)


def latest_step(run: Path) -> int:
    steps = [int(p.parent.name.split("=")[1]) for p in (run / "checkpoints").glob("step=*/metadata.json")]
    return max(steps, default=0)


def launch_and_kill(assets: dict[str, str], log: Path, *, group: bool) -> tuple[str, float]:
    """``scripts/train.sh 2`` on the tiny text job until it saves a new checkpoint; then SIGKILL the launcher's
    process group (or only the torchrun pid) and wait for every rank, and every process a rank started (megatron's
    checkpoint results-queue manager among them), to end. Returns (its output, seconds)."""
    run = Path(assets["runs"]) / "tiny"
    before = latest_step(run)
    command = [str(TRAIN_SH), "2", str(RECIPE), "name=tiny", f"exp_manager.exp_dir={assets['runs']}",
               f"model.mm_cfg.llm.from_pretrained={assets['llm']}", f"model.text_pretrain.data_path={assets['prefix']}",
               "model.tensor_model_parallel_size=2", "trainer.max_steps=100000", "model.text_pretrain.eval_interval=0",
               "exp_manager.checkpoint_every_n_steps=2"]  # fmt: skip
    with open(log, "w") as out:
        launcher = subprocess.Popen(command, env=plain_env(NEVA_PYTHON=sys.executable), stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    ranks: list[int] = []
    helpers: list[int] = []
    try:
        import psutil

        wait_for(lambda: latest_step(run) > before, 120, "a new checkpoint", launcher, log)
        ranks = [p.pid for p in psutil.Process(launcher.pid).children() if "neva_tools" in " ".join(p.cmdline())]
        assert len(ranks) == 2, ranks
        helpers = [c.pid for rank in ranks for c in psutil.Process(rank).children(recursive=True)]
        assert helpers, "the ranks have started no process (a checkpoint's results-queue manager was expected)"
        if group:
            os.killpg(launcher.pid, signal.SIGKILL)
        else:
            os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        start = time.monotonic()
        wait_for(lambda: not any(pid_alive(pid) for pid in ranks), 15, f"ranks {ranks} to die with torchrun", log=log)
        wait_for(lambda: not any(pid_alive(pid) for pid in helpers), 15, f"the ranks' processes {helpers} to die",
                 log=log)  # fmt: skip
        return log.read_text(errors="replace"), time.monotonic() - start
    finally:
        kill_all([launcher.pid, *ranks, *helpers])
        launcher.wait()


def test_killing_the_launcher_stops_the_ranks_and_the_rerun_resumes(text_assets: dict[str, str],
                                                                    tmp_path: Path) -> None:  # fmt: skip
    from neva_tools.export.run_dir import run_checkpoints

    run = Path(text_assets["runs"]) / "tiny"
    output, _ = launch_and_kill(text_assets, tmp_path / "first.log", group=True)  # kill -9 -<pgid>
    step = latest_step(run)
    assert (run / LOCK_NAME).exists() and not (run / "tiny.nemo").exists()  # a stale lock: its holder was killed
    time.sleep(1.0)
    assert latest_step(run) == step  # nobody trains on
    # the same command again: the stale lock does not stop it, it resumes; this time kill -9 only torchrun's pid
    output, _ = launch_and_kill(text_assets, tmp_path / "second.log", group=False)
    assert f"resuming from {run / 'checkpoints'}" in output
    assert latest_step(run) > step
    assert all(c.name.startswith("step=") for c in run_checkpoints(run))  # the lock file confuses no export
