"""A corrupt newest checkpoint never ends a run: each file cut short (``__0_0.distcp``, ``common.pt``, ``.metadata``,
``metadata.json``) makes the run resume from the previous checkpoint with a warning naming the file, and the save at
that step replaces the bad one; with no usable checkpoint (or an explicit ``resume_from_checkpoint`` that is bad)
it is one clear error. A full disk while saving a checkpoint is our error naming it, the incomplete one removed."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from dist_helpers import run_distributed

from neva_tools.errors import NevaError

TRUNCATED = ["__0_0.distcp", "common.pt", ".metadata", "metadata.json"]


def _cfg(resume_from: Path | None = None) -> Any:
    from omegaconf import OmegaConf

    explicit = str(resume_from) if resume_from else None
    return OmegaConf.create({"exp_manager": {"resume_from_checkpoint": explicit, "resume_if_exists": True,
                                             "resume_ignore_no_checkpoint": True}})  # fmt: skip


def train(rank: int, world_size: int, steps: int, root: str, every: int, logs: str, full_disk: str = "") -> Any:
    """Train the tiny NeVA (TP 1, DP ``world_size``) for ``steps`` steps, resuming as ``neva train`` does
    (``resume_checkpoint``) from ``ROOT/checkpoints``, saving every ``every`` steps. ``full_disk``: every write of
    the tensor files (``shards``) or of ``common.pt`` (``common``) fails with ENOSPC. Returns rank 0's losses, the
    step and the checkpoint it started from, or the ``NevaError``'s message."""
    import errno
    import io

    import torch
    from neva_tiny import build, samples
    from torch.utils.data import DataLoader

    from neva_tools.train.fit import PeriodicCheckpoint, TrainerSettings, consumed_samples, make_trainer
    from neva_tools.train.module import NevaModule, ScheduleSettings
    from neva_tools.train.optim import OptimSettings
    from neva_tools.train.paths import resume_checkpoint
    from neva_tools.train.sampler import ResumableSampler

    def no_space(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if full_disk == "shards":
        from megatron.core.dist_checkpointing.strategies import filesystem_async

        filesystem_async._write_item = no_space
    elif full_disk == "common":  # the file opens; nothing fits
        from neva_tools.train import checkpoint

        class Full(io.FileIO):
            write = no_space

        def full_open(path: str, mode: str = "r") -> Any:
            return Full(path, mode) if mode == "wb" else open(path, mode)

        checkpoint.open = full_open  # type: ignore[attr-defined]
    data = samples(32)
    root_path = Path(root)
    try:
        start = resume_checkpoint(_cfg(), root_path)
    except NevaError as exc:
        return str(exc)
    gbs = 2 * world_size
    sampler = ResumableSampler(len(data), dp_rank=rank, dp_size=world_size, seed=7,
                               consumed_samples=consumed_samples(start, gbs))  # fmt: skip

    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}

    loader = DataLoader(data, batch_size=2, sampler=sampler, collate_fn=collate)
    settings = TrainerSettings(max_steps=steps, tensor_model_parallel_size=1, micro_batch_size=2,
                               global_batch_size=gbs, progress=False)  # fmt: skip
    module = NevaModule(lambda: build(1, freeze_llm=False), OptimSettings(lr=1e-3, name="fused_adam"),
                        ScheduleSettings(max_steps=8, warmup_steps=2, min_lr=1e-4))  # fmt: skip
    log_dir = root_path / logs
    trainer = make_trainer(settings, log_dir, callbacks=[PeriodicCheckpoint(root_path / "checkpoints", every)])
    try:
        trainer.fit(module, loader, ckpt_path=str(start) if start else None)
    except NevaError as exc:
        return str(exc)
    losses = [float(line.split(",")[1]) for line in (log_dir / "loss.csv").read_text().splitlines()[1:]]
    return {"losses": losses, "step": trainer.global_step, "start": str(start) if start else None}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """4 steps with checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("saved")
    out = run_distributed(train, 1, 4, str(root), 2, "logs")[0]
    assert out["step"] == 4 and out["start"] is None
    return {**out, "root": root}


def _copy(saved: dict[str, Any], dest: Path) -> Path:
    shutil.copytree(saved["root"] / "checkpoints", dest / "checkpoints")
    return dest / "checkpoints"


@contextlib.contextmanager
def _logged(name: str) -> Iterator[list[logging.LogRecord]]:
    """The records of logger ``name`` at WARNING and above, whatever another test's CLI run did to the root's handlers
    (``setup_logging`` puts its level filter on every root handler, pytest's capture included)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger(name)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _cut(path: Path) -> Path:
    os.truncate(path, path.stat().st_size // 2)
    return path


@pytest.mark.parametrize("name", TRUNCATED)
def test_a_file_cut_short_falls_back_to_the_previous_checkpoint(name: str, saved: dict[str, Any],
                                                                 tmp_path: Path) -> None:  # fmt: skip
    from neva_tools.train import checkpoint as ckpt
    from neva_tools.train.paths import resume_checkpoint

    checkpoints = _copy(saved, tmp_path)
    assert resume_checkpoint(_cfg(), tmp_path) == checkpoints / "step=4"
    bad = _cut(checkpoints / "step=4" / name)
    found = ckpt.problems(checkpoints / "step=4")
    assert len(found) == 1 and str(bad) in found[0], found
    with _logged("neva_tools.train.paths") as records:
        assert resume_checkpoint(_cfg(), tmp_path) == checkpoints / "step=2"
    warnings = [r.getMessage() for r in records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and str(bad) in warnings[0] and f"resuming from {checkpoints / 'step=2'}" in warnings[0]


@pytest.mark.parametrize("name", TRUNCATED)
def test_no_usable_checkpoint_is_one_error_naming_the_files(name: str, saved: dict[str, Any], tmp_path: Path) -> None:
    from neva_tools.train.paths import resume_checkpoint

    checkpoints = _copy(saved, tmp_path)
    bad = [_cut(checkpoints / step / name) for step in ("step=4", "step=2")]
    with pytest.raises(NevaError, match=f"no checkpoint in {checkpoints} can be resumed from") as caught:
        resume_checkpoint(_cfg(), tmp_path)
    assert all(str(path) in str(caught.value) for path in bad)
    assert "exp_manager.resume_if_exists=false" in str(caught.value)


def test_an_explicit_corrupt_checkpoint_is_an_error(saved: dict[str, Any], tmp_path: Path) -> None:
    from neva_tools.train.paths import resume_checkpoint

    checkpoints = _copy(saved, tmp_path)
    bad = _cut(checkpoints / "step=4" / "__0_0.distcp")
    with pytest.raises(NevaError, match=f"resume_from_checkpoint \\({checkpoints / 'step=4'}\\) cannot be resumed "
                       f"from: {bad} is cut short: .*or resume from {checkpoints / 'step=2'}"):  # fmt: skip
        resume_checkpoint(_cfg(checkpoints / "step=4"), tmp_path)
    assert resume_checkpoint(_cfg(checkpoints / "step=2"), tmp_path) == checkpoints / "step=2"


def test_a_run_resumes_from_the_previous_checkpoint_and_replaces_the_bad_one(saved: dict[str, Any],
                                                                             tmp_path: Path) -> None:  # fmt: skip
    """The resumed run follows the uninterrupted loss curve from step 2 and writes a usable step 4 over the bad one
    (megatron-core alone would write over it and keep its stale files)."""
    from neva_tools.train import checkpoint as ckpt

    checkpoints = _copy(saved, tmp_path)
    _cut(checkpoints / "step=4" / "__0_0.distcp")
    (checkpoints / "step=4" / "__9_9.distcp").write_bytes(b"stale")  # a file only the bad checkpoint has
    out = run_distributed(train, 1, 4, str(tmp_path), 2, "resumed")[0]
    assert out["start"] == str(checkpoints / "step=2") and out["step"] == 4
    assert max(abs(a - b) for a, b in zip(out["losses"], saved["losses"][2:], strict=True)) <= 1e-5
    assert ckpt.problems(checkpoints / "step=4") == [] and not (checkpoints / "step=4" / "__9_9.distcp").exists()


@pytest.mark.parametrize(("where", "world"), [("shards", 1), ("common", 2)])
def test_a_full_disk_while_saving_a_checkpoint_is_our_error(where: str, world: int, tmp_path: Path) -> None:
    """On every rank: rank 0 names the checkpoint; a failure only rank 0 meets (``common.pt``) stops the others too
    (instead of leaving them waiting in the next collective)."""
    messages = run_distributed(train, world, 2, str(tmp_path), 2, "logs", where)
    step2 = tmp_path / "checkpoints" / "step=2"
    assert all(isinstance(m, str) for m in messages), messages
    assert messages[0].startswith(f"no space left on device while writing {step2}: the incomplete checkpoint was "
                                  "removed (a re-run resumes from the last complete one); free space")  # fmt: skip
    assert all(m == messages[0] for m in messages[1:])
    assert not step2.exists()
