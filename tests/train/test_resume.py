"""Checkpoint and resume: N steps + resume N steps = 2N uninterrupted steps; resume at another TP."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from dist_helpers import run_distributed


def run(rank: int, world_size: int, tp: int, steps: int, root: str, resume: bool, every: int) -> dict[str, Any]:
    """Train the tiny NeVA on distinct random batches for ``steps`` steps; optionally resume from the latest."""
    import torch
    from neva_tiny import IMAGE, VOCAB, build
    from torch.utils.data import DataLoader

    from neva_tools.train import checkpoint as ckpt
    from neva_tools.train.fit import PeriodicCheckpoint, TrainerSettings, consumed_samples, make_trainer
    from neva_tools.train.module import NevaModule, ScheduleSettings
    from neva_tools.train.optim import OptimSettings
    from neva_tools.train.sampler import ResumableSampler

    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(64):
        ids = torch.randint(3, VOCAB, (12,), generator=g)
        ids[1] = -200
        labels = torch.randint(3, VOCAB, (12,), generator=g)
        labels[:2] = -100
        data.append({"images": torch.randn(3, IMAGE, IMAGE, generator=g), "input_ids": ids, "labels": labels,
                     "position_ids": torch.arange(12)})  # fmt: skip
    root_path = Path(root)
    start = ckpt.latest(root_path / "checkpoints") if resume else None
    sampler = ResumableSampler(len(data), consumed_samples=consumed_samples(start, 2), seed=7)

    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}

    loader = DataLoader(data, batch_size=2, sampler=sampler, collate_fn=collate)
    settings = TrainerSettings(max_steps=steps, tensor_model_parallel_size=tp, micro_batch_size=2,
                               global_batch_size=2, progress=False)  # fmt: skip
    module = NevaModule(lambda: build(tp, freeze_llm=False), OptimSettings(lr=1e-3),
                        ScheduleSettings(max_steps=8, warmup_steps=2, min_lr=1e-4))  # fmt: skip
    log_dir = root_path / ("resumed" if resume else "first") / f"tp{tp}"
    trainer = make_trainer(settings, log_dir, callbacks=[PeriodicCheckpoint(root_path / "checkpoints", every)])
    trainer.fit(module, loader, ckpt_path=str(start) if start else None)
    losses = []
    if rank == 0:
        losses = [float(line.split(",")[1]) for line in (log_dir / "loss.csv").read_text().splitlines()[1:]]
    return {"losses": losses, "step": trainer.global_step}


def test_resume_continues_the_same_loss_curve(tmp_path: Path) -> None:
    full = run_distributed(run, 1, 1, 6, str(tmp_path / "full"), False, 0)[0]
    first = run_distributed(run, 1, 1, 3, str(tmp_path / "split"), False, 3)[0]
    assert (tmp_path / "split" / "checkpoints" / "step=3" / "metadata.json").is_file()
    second = run_distributed(run, 1, 1, 6, str(tmp_path / "split"), True, 3)[0]
    assert second["step"] == 6
    assert len(first["losses"]) == 3 and len(second["losses"]) == 3
    combined = first["losses"] + second["losses"]
    assert max(abs(a - b) for a, b in zip(combined, full["losses"], strict=True)) <= 1e-5


def test_resume_at_another_tp(tmp_path: Path) -> None:
    full = run_distributed(run, 1, 1, 6, str(tmp_path / "full"), False, 0)[0]
    run_distributed(run, 1, 1, 3, str(tmp_path / "split"), False, 3)
    second = run_distributed(run, 2, 2, 6, str(tmp_path / "split"), True, 3)[0]
    assert second["step"] == 6
    assert max(abs(a - b) for a, b in zip(second["losses"], full["losses"][3:], strict=True)) <= 1e-4
