"""The Lightning engine on CPU: a tiny NeVA learns; TP=2 follows TP=1's loss curve; accumulation rule."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from dist_helpers import run_distributed

from neva_tools.errors import NevaError
from neva_tools.train.fit import TrainerSettings, accumulation


def fit_tiny(rank: int, world_size: int, tp: int, steps: int, log_dir: str, lr: float,
             accumulate: int = 1) -> list[float]:  # fmt: skip
    """Train the tiny NeVA (LLM + projector) on a fixed repeated batch; return rank 0's per-step losses."""
    import torch
    from neva_tiny import batch, build
    from torch.utils.data import DataLoader

    from neva_tools.train.fit import make_trainer
    from neva_tools.train.module import NevaModule, ScheduleSettings
    from neva_tools.train.optim import OptimSettings

    b = batch()
    samples = [{k: v[i] for k, v in b.items()} for i in range(2)] * (steps * 2)

    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}

    loader = DataLoader(samples, batch_size=2, shuffle=False, collate_fn=collate)
    settings = TrainerSettings(max_steps=steps, tensor_model_parallel_size=tp, micro_batch_size=2,
                               global_batch_size=2 * (world_size // tp) * accumulate, progress=False)  # fmt: skip
    module = NevaModule(lambda: build(tp, freeze_llm=False), OptimSettings(lr=lr), ScheduleSettings(max_steps=steps))
    trainer = make_trainer(settings, log_dir)
    trainer.fit(module, loader)
    if rank != 0:
        return []
    with open(Path(log_dir) / "loss.csv") as fh:
        return [float(row["loss"]) for row in csv.DictReader(fh)]


def test_tiny_neva_learns_and_writes_curve(tmp_path: Path) -> None:
    losses = run_distributed(fit_tiny, 1, 1, 40, str(tmp_path), 3e-3)[0]
    assert len(losses) == 40
    assert losses[-1] < 0.3 * losses[0]
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert list((tmp_path / "csv").rglob("metrics.csv")) and list((tmp_path / "tensorboard").rglob("events.*"))


def test_tp2_and_dp2_follow_tp1_loss_curve(tmp_path: Path) -> None:
    tp1 = run_distributed(fit_tiny, 1, 1, 4, str(tmp_path / "tp1"), 1e-3)[0]
    tp2 = run_distributed(fit_tiny, 2, 2, 4, str(tmp_path / "tp2"), 1e-3)[0]
    assert max(abs(a - b) for a, b in zip(tp1, tp2, strict=True)) <= 1e-5
    # data parallel: both ranks see the same batches here, so DDP's averaged gradients equal TP=1's
    dp2 = run_distributed(fit_tiny, 2, 1, 4, str(tmp_path / "dp2"), 1e-3)[0]
    assert max(abs(a - b) for a, b in zip(tp1, dp2, strict=True)) <= 1e-5


def test_accumulation_rule() -> None:
    assert accumulation(TrainerSettings(max_steps=1, micro_batch_size=2, global_batch_size=16), 4) == 2
    assert accumulation(TrainerSettings(max_steps=1, tensor_model_parallel_size=2, micro_batch_size=2,
                                        global_batch_size=16), 4) == 4  # fmt: skip
    with pytest.raises(NevaError, match=r"global_batch_size \(10\) must be divisible by micro_batch_size \(4\)"):
        accumulation(TrainerSettings(max_steps=1, micro_batch_size=4, global_batch_size=10), 1)


def test_loss_curve_with_accumulation_is_per_step_and_unscaled(tmp_path: Path) -> None:
    """Two identical micro-batches per step give TP=1's curve: one row per optimizer step, the true loss."""
    plain = run_distributed(fit_tiny, 1, 1, 3, str(tmp_path / "plain"), 1e-3)[0]
    accumulated = run_distributed(fit_tiny, 1, 1, 3, str(tmp_path / "acc"), 1e-3, 2)[0]
    assert len(accumulated) == len(plain) == 3
    assert max(abs(a - b) for a, b in zip(plain, accumulated, strict=True)) <= 1e-5


def test_loss_curve_reads_the_device_every_log_interval(tmp_path: Path) -> None:
    """Micro-batch losses stay tensors until a ``log_every_n_steps`` boundary; the curve is the same."""
    from types import SimpleNamespace

    import torch

    from neva_tools.train.fit import LossCurve

    curve = LossCurve(tmp_path)
    trainer = SimpleNamespace(is_global_zero=True, log_every_n_steps=3, global_step=0)
    read_after = []
    for micro in range(12):  # 6 optimizer steps of 2 micro-batches
        trainer.global_step = micro // 2
        curve.on_train_batch_start(trainer, None, None, micro)
        trainer.global_step = (micro + 1) // 2  # the optimizer stepped after every second micro-batch
        curve.on_train_batch_end(trainer, SimpleNamespace(last_loss=torch.tensor(float(micro))), None, None, micro)
        read_after.append(len(curve.losses))
    assert read_after == [0, 0, 0, 0, 0, 6, 6, 6, 6, 6, 6, 12]  # read at steps 3 and 6 only
    assert curve.steps == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6] and curve.losses == [float(i) for i in range(12)]
