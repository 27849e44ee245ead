"""Running a training job: a Lightning ``Trainer`` with the megatron strategy, CSV/TensorBoard logs and a loss curve."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from neva_tools.train.loss_plot import LOSS_COLUMNS, LossRow, read_loss, read_val_loss, render
from neva_tools.train.strategy import EngineSettings, MegatronStrategy
from neva_tools.train.summary import RunInfo
from neva_tools.utils.atomic import atomic_path

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
    virtual_pipeline_model_parallel_size: int | None = None  # interleaved pipeline: model chunks per stage
    micro_batch_size: int = 1
    global_batch_size: int = 1
    precision: str = "32"
    gradient_clip_val: float = 1.0
    log_every_n_steps: int = 1
    num_nodes: int = 1
    seed: int = 1234
    progress: bool = True  # a progress bar on a terminal (rank 0); without one, or off: progress lines in the log
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
        plain = "a plain `neva train` is one process; " if world == 1 else ""
        raise NevaError(f"world size ({world}) must be divisible by TP×PP ({model_parallel}): {plain}launch a multiple "
                        f"of {model_parallel} processes, one per GPU, e.g. `scripts/train.sh {model_parallel} CONFIG "
                        "[key=value ...]` (torchrun on one node) or `sbatch ... scripts/train.sh slurm CONFIG` "
                        "(srun)")  # fmt: skip
    dp = world // model_parallel
    per_step = settings.micro_batch_size * dp
    if settings.global_batch_size % per_step:
        raise NevaError(f"global_batch_size ({settings.global_batch_size}) must be divisible by micro_batch_size "
                        f"({settings.micro_batch_size}) × data-parallel size ({dp})")  # fmt: skip
    return settings.global_batch_size // per_step


class LossCurve(pl.Callback):
    """Collects the training loss on rank 0 into ``loss.csv`` and renders ``loss.png`` (``neva_tools.train.loss_plot``).

    Micro-batch losses stay on the device and are read in one transfer every ``log_every_n_steps`` optimizer
    steps, when a checkpoint is saved and at the end, so the training loop does not wait for the device after every
    micro-batch. Each read appends a row per completed optimizer step to ``loss.csv``: the step, the mean loss of its
    micro-batches and its learning rate (the largest of the optimizer's parameter groups), so the file keeps what a
    crash leaves. A resumed run keeps the rows up to the step it resumed from and appends the rest: ``loss.csv`` and
    ``loss.png`` cover the whole run across restarts. ``title`` and ``vocab_size`` (the ln(V) line) go to the plot.
    """

    def __init__(self, directory: Path, *, title: str = "training loss", vocab_size: int | None = None) -> None:
        self.directory = Path(directory)
        self.title, self.vocab_size = title, vocab_size
        self.steps: list[int] = []  # this session's micro-batch losses, as read
        self.losses: list[float] = []
        self.rows: list[LossRow] = []  # one per optimizer step, the whole run
        self._pending: list[tuple[int, torch.Tensor]] = []
        self._lrs: dict[int, float] = {}
        self._step, self._read_at = 0, 0  # _read_at: the optimizer step of the last read
        self._written = 0  # rows already in loss.csv
        self._started = self._ended = False

    @property
    def csv_path(self) -> Path:
        """``loss.csv``."""
        return self.directory / "loss.csv"

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            resumed = trainer.global_step  # > 0: resumed from a checkpoint of that step
            self.rows = read_loss(self.csv_path, upto=resumed) if resumed else []
            self._rewrite()

    def _rewrite(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.csv_path) as tmp:
            tmp.write_text(",".join(LOSS_COLUMNS) + "\n" + "".join(row.csv() for row in self.rows))
        self._written, self._started = len(self.rows), True

    def read(self, step: int) -> None:
        """Read the losses of the optimizer steps up to ``step`` from the device and append their rows (rank 0)."""
        ready = [(s, loss) for s, loss in self._pending if s <= step]
        if not ready:
            return
        self._pending = [(s, loss) for s, loss in self._pending if s > step]
        values = torch.stack([loss.float() for _, loss in ready]).tolist()
        self.steps.extend(s for s, _ in ready)
        self.losses.extend(values)
        per_step: dict[int, list[float]] = {}
        for (s, _), value in zip(ready, values, strict=True):
            per_step.setdefault(s, []).append(value)
        self.rows.extend(LossRow(s, sum(v) / len(v), self._lrs.pop(s, None)) for s, v in sorted(per_step.items()))
        if not self._started:
            self._rewrite()
        elif len(self.rows) > self._written:
            with self.csv_path.open("a") as fh:
                fh.write("".join(row.csv() for row in self.rows[self._written :]))
            self._written = len(self.rows)

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:  # fmt: skip
        self._step = trainer.global_step + 1  # the optimizer step this micro-batch belongs to (1-based)
        if trainer.is_global_zero and self._step not in self._lrs:
            groups = getattr(getattr(module, "optimizer", None), "param_groups", None)
            if groups:  # host floats, set by the schedulers: the rate this step trains with
                self._lrs[self._step] = max(float(group["lr"]) for group in groups)

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        # the module's own micro-batch loss (unscaled by the accumulation count)
        loss = getattr(module, "last_loss", None)
        if loss is None:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs  # {}: a kept micro-batch
        if trainer.is_global_zero and loss is not None:  # with accumulation: several per step, averaged when read
            self._pending.append((self._step, loss.detach()))
            if trainer.global_step % max(1, trainer.log_every_n_steps) == 0 and trainer.global_step > self._read_at:
                self._read_at = trainer.global_step
                self.read(trainer.global_step)

    def on_save_checkpoint(self, trainer: pl.Trainer, module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.is_global_zero:  # a run resumed from this checkpoint keeps the rows up to it
            self.read(trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.read(trainer.global_step)  # a step stopped in the middle of its accumulation is not a step
            self._ended = True

    def on_fit_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        # after every callback's on_train_end: val_loss.csv (text pretraining) is written by then
        if self._ended and self.rows:
            self.render()

    def render(self) -> Any:
        """Draw ``loss.csv`` (and ``val_loss.csv`` when there is one) into ``loss.png``; the matplotlib Figure."""
        return render(self.csv_path, self.directory / "loss.png", title=self.title, vocab_size=self.vocab_size)


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


def checkpoint_step(checkpoint_dir: str | Path) -> int:
    """The optimizer step a dist checkpoint was saved at (its ``global_step``)."""
    from megatron.core import dist_checkpointing

    from neva_tools.checkpoint.safe_dist import check_directory

    check_directory(checkpoint_dir)
    common = dist_checkpointing.load_common_state_dict(str(checkpoint_dir)).get("common", {})
    return int(common.get("global_step", 0))


def consumed_samples(checkpoint_dir: str | Path | None, global_batch_size: int) -> int:
    """Global samples consumed by the run a checkpoint belongs to (0 without a checkpoint)."""
    if checkpoint_dir is None:
        return 0
    return checkpoint_step(checkpoint_dir) * global_batch_size


def make_trainer(
    settings: TrainerSettings,
    log_dir: str | Path,
    callbacks: list[pl.Callback] | None = None,
    *,
    run: RunInfo | None = None,
) -> pl.Trainer:
    """A ``Trainer`` for this process under torchrun/srun or alone (CPU: gloo).

    Lightning runs in fp32 ("32-true") without gradient clipping or accumulation of its own: the module trains
    through megatron-core (``Float16Module`` for bf16/fp16 weights, megatron-core's optimizer and clipping) and
    accumulates micro-batches itself, from the strategy's :class:`~neva_tools.train.strategy.EngineSettings`.
    Rank 0 reports through our own callbacks instead of Lightning's bar: the start summary
    (:class:`~neva_tools.train.summary.RunSummary`), the loss curve and the progress
    (:class:`~neva_tools.train.progress.TrainProgress`: a bar on a terminal when ``settings.progress``, else log
    lines). ``run`` names the run and its vocabulary for the summaries and the loss curve.
    """
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    from neva_tools.train.progress import TrainProgress
    from neva_tools.train.summary import RunSummary

    world = world_size()
    log_dir = Path(log_dir)
    devices = max(1, world // settings.num_nodes)
    engine = EngineSettings(precision=settings.precision, clip_grad=float(settings.gradient_clip_val or 0.0),
                            accumulate=accumulation(settings, world), tf32=settings.tf32,
                            initial_loss_scale=settings.initial_loss_scale,
                            loss_scale_window=settings.loss_scale_window, hysteresis=settings.hysteresis)  # fmt: skip
    vpp = settings.virtual_pipeline_model_parallel_size
    strategy = MegatronStrategy(settings.tensor_model_parallel_size, settings.pipeline_model_parallel_size,
                                seed=settings.seed, engine=engine,
                                virtual_pipeline_model_parallel_size=vpp)  # fmt: skip
    dp = world // (settings.tensor_model_parallel_size * settings.pipeline_model_parallel_size)
    curve = LossCurve(log_dir, title=run.title if run else "training loss", vocab_size=run.vocab_size if run else None)
    ours = [curve, RunSummary(settings, run, log_dir), TrainProgress(curve, dp=dp, bar=settings.progress)]
    return pl.Trainer(
        accelerator="gpu" if torch.cuda.is_available() else "cpu",
        devices=devices,
        num_nodes=settings.num_nodes,
        strategy=strategy,
        precision="32-true",
        max_steps=settings.max_steps,
        log_every_n_steps=settings.log_every_n_steps,
        logger=[CSVLogger(log_dir, name="csv"), TensorBoardLogger(log_dir, name="tensorboard")],
        callbacks=[*ours, *(callbacks or [])],  # the curve first: it reads a step's losses before others use them
        enable_progress_bar=False,  # TrainProgress instead (no "Epoch 0/-2"; lines in log files)
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # data is split by ResumableSampler (data-parallel rank, resumable)
        deterministic=False,
    )


def fit(trainer: pl.Trainer, module: pl.LightningModule, resume: Path | None, consumed: int, final: Any,
        log_dir: Path) -> Path | None:  # fmt: skip
    """``trainer.fit`` from ``resume`` (or the start); returns ``final.output``, the run's ``.nemo`` on rank 0.

    A run whose checkpoint already reached ``trainer.max_steps`` does nothing: it says so and returns the ``.nemo``
    it wrote then (``final.path``). Global rank 0 logs the end-of-run summary.
    """
    from neva_tools.model.parallel import launch_env
    from neva_tools.train.summary import RunSummary, end_text, log_lines

    rank0 = launch_env().rank == 0
    if resume is not None:
        step = checkpoint_step(resume)
        if step >= trainer.max_steps:
            return _finished(trainer.max_steps, step, resume, Path(final.path), rank0)
        logger.info("resuming from %s (step %d, %d samples consumed)", resume, step, consumed)
    trainer.fit(module, ckpt_path=str(resume) if resume else None)
    curve = next((c for c in trainer.callbacks if isinstance(c, LossCurve)), None)
    summary = next((c for c in trainer.callbacks if isinstance(c, RunSummary)), None)
    if rank0 and curve is not None and summary is not None:
        text = end_text(summary.run, step=trainer.global_step, max_steps=trainer.max_steps,
                        start_step=summary.start_step, seconds=summary.elapsed(), rows=curve.rows,
                        nemo=final.output, log_dir=Path(log_dir),
                        val=read_val_loss(Path(log_dir) / "val_loss.csv"))  # fmt: skip
        log_lines(text)
    return final.output


def _finished(max_steps: int, step: int, resume: Path, nemo: Path, rank0: bool) -> Path | None:
    """A re-run of a finished run: the message, and its ``.nemo`` (on rank 0)."""
    from neva_tools.errors import NevaError

    past = f" (its checkpoint {resume} is at step {step})" if step > max_steps else ""
    if not nemo.is_file():
        raise NevaError(f"the run already reached max_steps ({max_steps}){past}, but its final model {nemo} is "
                        f"missing (the run stopped while writing it?); raise trainer.max_steps to train on and write "
                        f"it, or use another name=")  # fmt: skip
    if rank0:
        logger.warning("nothing to do: the run already reached max_steps (%d)%s; raise trainer.max_steps to "
                       "continue, or use another name=. Final model: %s", max_steps, past, nemo)  # fmt: skip
    return nemo if rank0 else None


def loader_workers(num_workers: int) -> dict[str, Any]:
    """``DataLoader`` worker options: workers start from a fork server, not by forking the training process.

    Forking a process that runs threads (TensorBoard's writer, torch's pools, gloo) can leave the child stuck
    inside ``fork`` on a lock another thread held; seen here once as a rank waiting forever for its first batch
    while the other rank waited in an all-reduce. Persistent workers pay the start-up once per run.
    """
    if num_workers <= 0:
        return {"num_workers": 0}
    return {"num_workers": num_workers, "multiprocessing_context": "forkserver", "persistent_workers": True}
