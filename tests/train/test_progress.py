"""Training progress on rank 0: log lines when the output is not a terminal (driven with a fake trainer and clock,
and read from the log of a real tiny ``neva train`` while it runs), a bar on a terminal, never Lightning's bar."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from neva_tools.train import progress as progress_mod
from neva_tools.train.fit import LossCurve, TrainerSettings, make_trainer
from neva_tools.train.progress import TrainProgress, is_terminal
from neva_tools.train.summary import RunSummary

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "inference"))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class ReadCounter(LossCurve):
    """A LossCurve that records the optimizer steps at which it read losses from the device."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.read_at: list[int] = []

    def read(self, step: int) -> None:
        before = len(self.losses)
        super().read(step)
        if len(self.losses) > before:
            self.read_at.append(step)


def drive(tmp_path: Path, steps: int, *, log_every: int, seconds_per_step: float, dp: int = 2,
          stream: Any = None, bar: bool = False) -> tuple[ReadCounter, TrainProgress]:  # fmt: skip
    """``steps`` optimizer steps of 2 micro-batches of 2 rows × 10 tokens; step s has loss s and lr 0.01."""
    clock, curve = Clock(), ReadCounter(tmp_path)
    progress = TrainProgress(curve, dp=dp, bar=bar, clock=clock, stream=stream or io.StringIO())
    trainer = SimpleNamespace(is_global_zero=True, global_step=0, max_steps=steps, log_every_n_steps=log_every)
    optimizer = SimpleNamespace(param_groups=[{"lr": 0.001}, {"lr": 0.01}])
    curve.on_train_start(trainer, None)
    progress.on_train_start(trainer, None)
    for step in range(1, steps + 1):
        module = SimpleNamespace(last_loss=torch.tensor(float(step)), optimizer=optimizer)
        for micro in range(2):
            batch = {"input_ids": torch.zeros(2, 10, dtype=torch.long)}
            curve.on_train_batch_start(trainer, module, batch, micro)
            progress.on_train_batch_start(trainer, module, batch, micro)
            clock.now += seconds_per_step / 2
            trainer.global_step += micro  # the optimizer steps after the second micro-batch
            curve.on_train_batch_end(trainer, module, None, batch, micro)
            progress.on_train_batch_end(trainer, module, None, batch, micro)
    curve.on_train_end(trainer, None)
    progress.on_train_end(trainer, None)
    return curve, progress


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "neva_tools.train.progress"]


def test_log_lines_every_log_interval_with_all_fields(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Not a terminal: a line after the first step and every log_every_n_steps; losses read only then."""
    caplog.set_level(logging.INFO)
    curve, _ = drive(tmp_path, 10, log_every=5, seconds_per_step=1.0)
    lines = _lines(caplog)
    assert [line.split(" | ")[0] for line in lines] == ["step 1/10", "step 5/10", "step 10/10"]
    # rank 0 sees 2 micro-batches × 2 rows × 10 tokens per second; 2 data-parallel ranks
    assert lines[1] == "step 5/10 | loss 5.0000 | lr 0.01 | 80 tok/s | 8 samples/s | elapsed 0:00:05 | ETA 0:00:05"
    assert lines[0].endswith("| ETA -") and lines[2].endswith("| ETA 0:00:00")
    assert curve.read_at == [1, 5, 10]  # no read from the device for a step that is not shown


def test_a_line_at_least_every_30_seconds(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Slow steps and a long log interval: a line every 30 s anyway, with the loss of that step (read then)."""
    caplog.set_level(logging.INFO)
    curve, _ = drive(tmp_path, 10, log_every=100, seconds_per_step=10.0, dp=1)
    lines = _lines(caplog)
    assert [line.split(" | ")[:2] for line in lines] == [
        ["step 1/10", "loss 1.0000"], ["step 4/10", "loss 4.0000"], ["step 7/10", "loss 7.0000"],
        ["step 10/10", "loss 10.0000"],
    ]  # fmt: skip
    assert lines[1].split(" | ")[3:5] == ["4 tok/s", "0.4 samples/s"]  # 40 tokens, 4 rows in 10 s
    assert curve.read_at == [1, 4, 7, 10]
    assert [r.step for r in curve.rows] == list(range(1, 11)) and curve.rows[0].lr == 0.01


def test_bar_on_a_terminal_and_no_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    import neva_tools.utils.log as log_mod

    caplog.set_level(logging.INFO)
    monkeypatch.setattr(log_mod, "_PROGRESS_ENABLED", True)  # an earlier main([... "--no-progress"]) may have left it
    monkeypatch.setattr(progress_mod, "is_terminal", lambda stream: True)
    stream = io.StringIO()
    _, progress = drive(tmp_path, 6, log_every=2, seconds_per_step=1.0, stream=stream, bar=True)
    shown = stream.getvalue()
    assert "train 6/6 steps" in shown and "loss 6.0000, lr 0.01, 80 tok/s, 8 samples/s" in shown
    assert "Epoch" not in shown and _lines(caplog) == [] and progress.bar is None


def test_no_progress_gives_lines_on_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """``--no-progress`` / NEVA_NO_PROGRESS (neva_tools.utils.log's switch): no bar, the plain lines instead."""
    from neva_tools.utils import log

    caplog.set_level(logging.INFO)
    monkeypatch.setattr(progress_mod, "is_terminal", lambda stream: True)
    monkeypatch.setattr(log, "_PROGRESS_ENABLED", False)
    stream = io.StringIO()
    _, progress = drive(tmp_path, 4, log_every=2, seconds_per_step=1.0, stream=stream, bar=True)
    assert stream.getvalue() == "" and progress.bar is None
    assert [line.split(" | ")[0] for line in _lines(caplog)] == ["step 1/4", "step 2/4", "step 4/4"]


def test_is_terminal_needs_a_tty_with_a_width() -> None:
    import fcntl
    import pty
    import struct
    import termios

    assert not is_terminal(io.StringIO())
    master, slave = pty.openpty()
    try:
        stream = os.fdopen(slave, "w")
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        assert is_terminal(stream)
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
        assert not is_terminal(stream)  # a pseudo-terminal without a size would show no bar at all
        stream.close()
    finally:
        os.close(master)


def test_trainer_has_our_callbacks_and_not_lightnings_bar(tmp_path: Path) -> None:
    trainer = make_trainer(TrainerSettings(max_steps=3, progress=True), tmp_path)
    assert trainer.progress_bar_callback is None
    kinds = [type(c) for c in trainer.callbacks]
    assert kinds.index(LossCurve) < kinds.index(TrainProgress) and RunSummary in kinds


def test_progress_lines_appear_in_the_log_while_a_tiny_run_trains(tmp_path: Path) -> None:
    """``neva train`` with stderr in a file (as under nohup or SLURM): the step lines are there before it ends."""
    from tiny_neva import build_assets, train_overrides

    assets = build_assets(tmp_path)
    overrides = [*train_overrides(assets, "progress", 30), "model.micro_batch_size=4", "model.global_batch_size=4",
                 "trainer.log_every_n_steps=5", "trainer.enable_progress_bar=true"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NEVA_NO_PROGRESS")}
    log = tmp_path / "train.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "neva_tools", "train", *overrides], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline, seen_running = time.monotonic() + 300, []
        while time.monotonic() < deadline and proc.poll() is None:
            text = log.read_text()
            if "step 5/30 |" in text:
                seen_running.append(proc.poll() is None and "finished:" not in text)
                break
            time.sleep(0.2)
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        proc.kill()
    assert seen_running == [True], "no progress line was in the log while the run trained"
    lines = [line for line in log.read_text().splitlines() if re.match(r"INFO: step \d+/30 \|", line)]
    assert [line.split(" | ")[0] for line in lines] == [f"INFO: step {s}/30" for s in (1, 5, 10, 15, 20, 25, 30)]
    for line in lines[1:]:
        assert re.fullmatch(r"INFO: step \d+/30 \| loss \d+\.\d{4} \| lr [0-9.e-]+ \| [0-9.k]+ tok/s \| [0-9.k]+ "
                            r"samples/s \| elapsed \d:\d\d:\d\d \| ETA \d:\d\d:\d\d", line), line  # fmt: skip
    assert "Epoch" not in log.read_text()
