"""Running a training job: a Lightning ``Trainer`` with the megatron strategy, CSV/TensorBoard logs and a loss curve."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from neva_tools.train.strategy import EngineSettings, MegatronStrategy

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainerSettings:
    """NeMo's ``trainer`` section (the parts this engine uses) plus the parallel sizes.

    ``precision`` is the parameter dtype megatron-core trains in: ``32``, ``bf16`` or ``fp16`` (16-bit weights with
    fp32 master weights in the optimizer; fp16 with dynamic loss scaling); ``neva_tools.train.run.trainer_precision``
    maps NeMo's values. ``gradient_clip_val`` is megatron-core's ``clip_grad`` (0 disables).
    """

    max_steps: int
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    micro_batch_size: int = 1
    global_batch_size: int = 1
    precision: str = "32"
    gradient_clip_val: float = 1.0
    log_every_n_steps: int = 1
    num_nodes: int = 1
    seed: int = 1234
    progress: bool = True
    tf32: bool = True
    initial_loss_scale: float = 2.0**32  # fp16 only: megatron-core's dynamic loss scaler (NeMo's native_amp_* keys)
    loss_scale_window: int = 1000
    hysteresis: int = 2


def world_size() -> int:
    """Processes in the job, from the launcher's environment (1 for a plain process)."""
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))


def accumulation(settings: TrainerSettings, world: int) -> int:
    """Gradient accumulation steps: global = micro × accumulation × data-parallel size (NeMo's rule)."""
    from neva_tools.errors import NevaError

    model_parallel = settings.tensor_model_parallel_size * settings.pipeline_model_parallel_size
    if world % model_parallel:
        raise NevaError(f"world size ({world}) must be divisible by TP×PP ({model_parallel})")
    dp = world // model_parallel
    per_step = settings.micro_batch_size * dp
    if settings.global_batch_size % per_step:
        raise NevaError(f"global_batch_size ({settings.global_batch_size}) must be divisible by micro_batch_size "
                        f"({settings.micro_batch_size}) × data-parallel size ({dp})")  # fmt: skip
    return settings.global_batch_size // per_step


class LossCurve(pl.Callback):
    """Collects the training loss on rank 0 and writes ``loss.png`` (and ``loss.csv``) when training ends.

    Micro-batch losses stay on the device and are read in one transfer every ``log_every_n_steps`` optimizer
    steps (and at the end), so the training loop does not wait for the device after every micro-batch.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.steps: list[int] = []
        self.losses: list[float] = []
        self._pending: list[tuple[int, torch.Tensor]] = []
        self._step, self._read_at = 0, 0  # _read_at: the optimizer step of the last read

    def _flush(self) -> None:
        if self._pending:
            values = torch.stack([loss.float() for _, loss in self._pending]).tolist()
            self.steps.extend(step for step, _ in self._pending)
            self.losses.extend(values)
            self._pending.clear()

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:  # fmt: skip
        self._step = trainer.global_step + 1  # the optimizer step this micro-batch belongs to (1-based)

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        # the module's own micro-batch loss (unscaled by the accumulation count)
        loss = getattr(module, "last_loss", None)
        if loss is None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if trainer.is_global_zero and loss is not None:  # with accumulation: several per step, averaged below
            self._pending.append((self._step, loss.detach()))
            if trainer.global_step % max(1, trainer.log_every_n_steps) == 0 and trainer.global_step > self._read_at:
                self._read_at = trainer.global_step
                self._flush()

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._flush()
        if not trainer.is_global_zero or not self.losses:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        per_step: dict[int, list[float]] = {}
        for step, loss in zip(self.steps, self.losses, strict=True):
            per_step.setdefault(step, []).append(loss)
        steps = sorted(per_step)
        means = [sum(per_step[s]) / len(per_step[s]) for s in steps]
        self.directory.mkdir(parents=True, exist_ok=True)
        rows = "".join(f"{s},{v}\n" for s, v in zip(steps, means, strict=True))
        (self.directory / "loss.csv").write_text("step,loss\n" + rows)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(steps, means)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(self.directory / "loss.png", dpi=100)
        plt.close(fig)


class PeriodicCheckpoint(pl.Callback):
    """Save a dist checkpoint every ``every_n_steps`` optimizer steps and at the end (``dirpath/step=N``).

    Saves only after the micro-batch that completed an optimizer step (never in the middle of gradient accumulation).
    ``keep`` is ``exp_manager.save_top_k`` (LLaVA's ``--save_total_limit``): after each save is complete on every
    rank, global rank 0 deletes the oldest ``step=N`` directories so that the newest ``keep`` remain (the one just
    written always among them; ``protect``, the checkpoint the run resumed from, is never deleted); -1 keeps all;
    0 writes none (the run cannot be resumed; its ``.nemo`` is still written at the end).
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int, *, keep: int = -1,
                 protect: str | Path | None = None) -> None:  # fmt: skip
        self.dirpath, self.every, self.keep = Path(dirpath), every_n_steps, keep
        self.protect = [Path(protect)] if protect is not None else []
        self._last = -1
        self._step_before = 0  # trainer.global_step when the current micro-batch started

    def _save(self, trainer: pl.Trainer) -> None:
        from neva_tools.train import checkpoint as ckpt

        step = trainer.global_step
        if step != self._last and step > 0 and self.keep != 0:
            path = self.dirpath / f"step={step}"
            trainer.save_checkpoint(path, weights_only=False)
            self._last = step
            if self.keep > 0:
                trainer.strategy.barrier("neva_checkpoint_saved")  # every rank has written its part
                if trainer.is_global_zero:
                    for old in ckpt.prune(self.dirpath, self.keep, protect=[path, *self.protect]):
                        logger.info("deleted checkpoint %s (exp_manager.save_top_k %d)", old, self.keep)

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:  # fmt: skip
        self._step_before = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        stepped = trainer.global_step != self._step_before
        if self.every > 0 and stepped and trainer.global_step % self.every == 0:
            self._save(trainer)

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._save(trainer)


def consumed_samples(checkpoint_dir: str | Path | None, global_batch_size: int) -> int:
    """Global samples consumed by the run a checkpoint belongs to (0 without a checkpoint)."""
    if checkpoint_dir is None:
        return 0
    from megatron.core import dist_checkpointing

    from neva_tools.checkpoint.safe_dist import check_directory

    check_directory(checkpoint_dir)
    common = dist_checkpointing.load_common_state_dict(str(checkpoint_dir)).get("common", {})
    return int(common.get("global_step", 0)) * global_batch_size


def make_trainer(
    settings: TrainerSettings, log_dir: str | Path, callbacks: list[pl.Callback] | None = None
) -> pl.Trainer:
    """A ``Trainer`` for this process under torchrun/srun or alone (CPU: gloo).

    Lightning runs in fp32 ("32-true") without gradient clipping or accumulation of its own: the module trains
    through megatron-core (``Float16Module`` for bf16/fp16 weights, megatron-core's optimizer and clipping) and
    accumulates micro-batches itself, from the strategy's :class:`~neva_tools.train.strategy.EngineSettings`.
    """
    from pytorch_lightning.callbacks import TQDMProgressBar
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    world = world_size()
    log_dir = Path(log_dir)
    devices = max(1, world // settings.num_nodes)
    engine = EngineSettings(precision=settings.precision, clip_grad=float(settings.gradient_clip_val or 0.0),
                            accumulate=accumulation(settings, world), tf32=settings.tf32,
                            initial_loss_scale=settings.initial_loss_scale,
                            loss_scale_window=settings.loss_scale_window, hysteresis=settings.hysteresis)  # fmt: skip
    strategy = MegatronStrategy(settings.tensor_model_parallel_size, settings.pipeline_model_parallel_size,
                                seed=settings.seed, engine=engine)  # fmt: skip
    # the bar reads the logged loss from the device when it refreshes: as often as the metrics are logged
    progress = [TQDMProgressBar(refresh_rate=max(1, settings.log_every_n_steps))] if settings.progress else []
    return pl.Trainer(
        accelerator="gpu" if torch.cuda.is_available() else "cpu",
        devices=devices,
        num_nodes=settings.num_nodes,
        strategy=strategy,
        precision="32-true",
        max_steps=settings.max_steps,
        log_every_n_steps=settings.log_every_n_steps,
        logger=[CSVLogger(log_dir, name="csv"), TensorBoardLogger(log_dir, name="tensorboard")],
        callbacks=[LossCurve(log_dir), *progress, *(callbacks or [])],
        enable_progress_bar=settings.progress,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # data is split by ResumableSampler (data-parallel rank, resumable)
        deterministic=False,
    )


def fit(trainer: pl.Trainer, module: pl.LightningModule, resume: Path | None, consumed: int, final: Any,
        log_dir: Path) -> Path | None:  # fmt: skip
    """``trainer.fit`` from ``resume`` (or the start); returns ``final.output``, the run's ``.nemo`` on rank 0."""
    if resume is not None:
        logger.info("resuming from %s (%d samples consumed)", resume, consumed)
    trainer.fit(module, ckpt_path=str(resume) if resume else None)
    if final.output is not None:
        logger.info("final model: %s; logs and loss.png: %s", final.output, log_dir)
    return final.output


def loader_workers(num_workers: int) -> dict[str, Any]:
    """``DataLoader`` worker options: workers start from a fork server, not by forking the training process.

    Forking a process that runs threads (TensorBoard's writer, torch's pools, gloo) can leave the child stuck
    inside ``fork`` on a lock another thread held; seen here once as a rank waiting forever for its first batch
    while the other rank waited in an all-reduce. Persistent workers pay the start-up once per run.
    """
    if num_workers <= 0:
        return {"num_workers": 0}
    return {"num_workers": num_workers, "multiprocessing_context": "forkserver", "persistent_workers": True}
