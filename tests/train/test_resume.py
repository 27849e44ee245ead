"""Checkpoint and resume: N steps + resume N steps = 2N uninterrupted steps; resume at another TP; the distributed
optimizer (``distributed_fused_adam``) at DP=2 resumes on the same curve, and its checkpoint resumes at DP=1."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from dist_helpers import run_distributed


def run(rank: int, world_size: int, tp: int, steps: int, root: str, resume: bool | str, every: int,
        optimizer: str = "fused_adam", global_batch: int = 2,
        projector_lr: float | None = None) -> dict[str, Any]:  # fmt: skip
    """Train the tiny NeVA on distinct random batches for ``steps`` steps; optionally resume from the latest
    checkpoint (``resume=True``) or from a given one (a path). Returns rank 0's losses, the step and its weights."""
    import torch
    from neva_tiny import build, samples
    from torch.utils.data import DataLoader

    from neva_tools.train import checkpoint as ckpt
    from neva_tools.train.fit import PeriodicCheckpoint, TrainerSettings, consumed_samples, make_trainer
    from neva_tools.train.module import NevaModule, ScheduleSettings
    from neva_tools.train.optim import OptimSettings
    from neva_tools.train.sampler import ResumableSampler

    data = samples(64)  # every sample has 10 supervised tokens: any split of a global batch gives the same gradient
    root_path = Path(root)
    if isinstance(resume, str):
        start: Path | None = Path(resume)
    else:
        start = ckpt.latest(root_path / "checkpoints") if resume else None
    dp = world_size // tp
    sampler = ResumableSampler(len(data), dp_rank=rank // tp, dp_size=dp, seed=7,
                               consumed_samples=consumed_samples(start, global_batch))  # fmt: skip

    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}

    loader = DataLoader(data, batch_size=2, sampler=sampler, collate_fn=collate)
    settings = TrainerSettings(max_steps=steps, tensor_model_parallel_size=tp, micro_batch_size=2,
                               global_batch_size=global_batch, progress=False)  # fmt: skip
    optim = OptimSettings(lr=1e-3, projector_lr=projector_lr, name=optimizer)
    module = NevaModule(lambda: build(tp, freeze_llm=False), optim,
                        ScheduleSettings(max_steps=8, warmup_steps=2, min_lr=1e-4))  # fmt: skip
    log_dir = root_path / ("resumed" if resume else "first") / f"tp{tp}_dp{dp}"
    trainer = make_trainer(settings, log_dir, callbacks=[PeriodicCheckpoint(root_path / "checkpoints", every)])
    trainer.fit(module, loader, ckpt_path=str(start) if start else None)
    losses, weights = [], {}
    if rank == 0:
        losses = [float(line.split(",")[1]) for line in (log_dir / "loss.csv").read_text().splitlines()[1:]]
        if tp == 1:
            weights = {k: v.detach().float().clone() for k, v in module.model.named_parameters() if v.requires_grad}
    lrs = {g["part"]: g["lr"] for g in module.optimizer.param_groups}
    return {"losses": losses, "step": trainer.global_step, "weights": weights, "lrs": lrs}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("full")
    return {**run_distributed(run, 1, 1, 6, str(root), False, 0)[0], "root": root}


def _max_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def test_resume_continues_the_same_loss_curve(tmp_path: Path, uninterrupted: dict[str, Any]) -> None:
    first = run_distributed(run, 1, 1, 3, str(tmp_path / "split"), False, 3)[0]
    assert (tmp_path / "split" / "checkpoints" / "step=3" / "metadata.json").is_file()
    second = run_distributed(run, 1, 1, 6, str(tmp_path / "split"), True, 3)[0]
    assert second["step"] == 6
    assert len(first["losses"]) == 3 and len(second["losses"]) == 3
    assert _max_diff(first["losses"] + second["losses"], uninterrupted["losses"]) <= 1e-5


def test_resume_at_another_tp(tmp_path: Path, uninterrupted: dict[str, Any]) -> None:
    run_distributed(run, 1, 1, 3, str(tmp_path / "split"), False, 3)
    second = run_distributed(run, 2, 2, 6, str(tmp_path / "split"), True, 3)[0]
    assert second["step"] == 6
    assert _max_diff(second["losses"], uninterrupted["losses"][3:]) <= 1e-4


def test_distributed_optimizer_resumes_at_dp2_and_at_dp1(tmp_path: Path) -> None:
    """``distributed_fused_adam`` at DP=2 (global batch 4, the projector at 10× the LLM's rate): 3 + 3 resumed steps
    follow 6 uninterrupted ones. Its step-3 checkpoint also resumes at DP=1 (the state shards regathered; 2
    micro-batches accumulated per step) and ends with the same weights as the DP=2 run."""
    dist = ("distributed_fused_adam", 4, 1e-2)
    full = run_distributed(run, 2, 1, 6, str(tmp_path / "full"), False, 0, *dist)[0]
    first = run_distributed(run, 2, 1, 3, str(tmp_path / "split"), False, 3, *dist)[0]
    step3 = tmp_path / "split" / "checkpoints" / "step=3"
    second = run_distributed(run, 2, 1, 6, str(tmp_path / "split"), True, 3, *dist)[0]
    assert second["step"] == 6 and len(second["losses"]) == 3
    assert _max_diff(first["losses"] + second["losses"], full["losses"]) <= 1e-5
    assert second["lrs"] == full["lrs"] and full["lrs"]["projector"] == pytest.approx(10 * full["lrs"]["llm"])
    at_dp1 = run_distributed(run, 1, 1, 6, str(tmp_path / "dp1"), str(step3), 0, *dist)[0]
    assert at_dp1["step"] == 6 and len(at_dp1["losses"]) == 3 and at_dp1["lrs"] == full["lrs"]
    assert max((at_dp1["weights"][k] - v).abs().max().item() for k, v in full["weights"].items()) <= 1e-5
    moved = max((second["weights"][k] - v).abs().max().item() for k, v in first["weights"].items())
    assert moved > 1e-4  # the last three steps did change the weights


def test_resume_with_another_optimizer_or_precision_is_refused(uninterrupted: dict[str, Any]) -> None:
    """Each optimizer and precision stores its own state: a checkpoint resumes only with the ones it was written with
    (checked before anything is read into the model)."""
    import torch

    from neva_tools.errors import NevaError
    from neva_tools.train import checkpoint as ckpt

    step6 = uninterrupted["root"] / "checkpoints" / "step=6"
    for engine in ({"optimizer": "distributed_fused_adam", "precision": "32"},
                   {"optimizer": "fused_adam", "precision": "bf16"}):  # fmt: skip
        with pytest.raises(NevaError, match="optimizer state of model.optim.name fused_adam and precision 32 but this "
                           f"run trains with model.optim.name {engine['optimizer']} and precision "
                           f"{engine['precision']}: resume with"):  # fmt: skip
            ckpt.load(step6, torch.nn.Linear(1, 1), object(), engine=engine)
