"""What a training run tells its user at the start and at the end (global rank 0, through ``logging``).

At the start (:class:`RunSummary`, once the model is built and a resumed run's step is known): the model's parts and
which of them train (parameter counts of the whole model, tensor-parallel shards counted once), TP/PP/DP, the micro
and global batch and the accumulation between them, the samples of each dataset and the epochs ``max_steps`` covers,
precision, optimizer and schedule, and where logs, checkpoints and the final model go. At the end
(:func:`end_text`, logged by ``neva_tools.train.fit.fit``): steps and time, the final and the best loss, the
``.nemo`` and the commands to run next.
"""

from __future__ import annotations

import datetime
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

logger = logging.getLogger(__name__)

#: The parts of a NeVA model (``LLaVAModel`` attributes) and their names; a GPT model is the LLM alone.
PARTS = (("language_model", "LLM"), ("vision_model", "vision tower"), ("vision_projection", "projector"))


@dataclass(frozen=True)
class RunInfo:
    """What a run is, for its summaries and its loss curve: ``kind`` is ``neva`` or ``text`` (text pretraining)."""

    name: str
    stage: str
    kind: str = "neva"
    vocab_size: int | None = None
    nemo: Path | None = None
    image_folder: str | None = None

    @property
    def title(self) -> str:
        """The loss curve's title: run name and stage."""
        return f"{self.name} · {self.stage}"


def run_info(cfg: DictConfig, vocab_size: int | None) -> RunInfo:
    """The :class:`RunInfo` of a ``neva train`` config; ``vocab_size`` is the model's vocabulary (ln of it is the loss
    of uniform guessing)."""
    from neva_tools.train.paths import run_directory

    nemo = run_directory(cfg) / f"{cfg.name}.nemo"
    if OmegaConf.select(cfg, "model.text_pretrain.enabled", default=False):
        return RunInfo(str(cfg.name), "text pretraining", "text", vocab_size, nemo)
    frozen = bool(OmegaConf.select(cfg, "model.mm_cfg.llm.freeze", default=True))
    tower = not bool(OmegaConf.select(cfg, "model.mm_cfg.vision_encoder.freeze", default=True))
    if frozen:
        stage = "NeVA stage 1: pretraining (LLM frozen" + (", vision tower trains)" if tower else ")")
    elif tower:
        stage = "NeVA stage 1.5/2: LLM and vision tower train"
    else:
        stage = "NeVA stage 2: finetuning (LLM trains)"
    folder = OmegaConf.select(cfg, "model.data.image_folder", default=None)
    return RunInfo(str(cfg.name), stage, "neva", vocab_size, nemo, None if folder is None else str(folder))


def count(n: float) -> str:
    """A parameter or sample count for people: 123, 45.6k, 7.24M, 1.30B."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return str(int(n)) if float(n).is_integer() else f"{n:.3g}"


def duration(seconds: float) -> str:
    """``H:MM:SS``."""
    return str(datetime.timedelta(seconds=round(max(seconds, 0.0))))


def part_counts(model: Any, tp: int = 1) -> list[tuple[str, int, int]]:
    """(part, trainable, frozen) parameter counts of the whole model: a tensor-parallel shard (megatron-core's
    ``tensor_model_parallel`` attribute) counts ``tp`` times, so every TP rank reports the same numbers."""
    parts = [(label, getattr(model, attr)) for attr, label in PARTS if getattr(model, attr, None) is not None]
    if not parts:
        parts = [("LLM", model)]
    counts = []
    for label, part in parts:
        trainable = frozen = 0
        for p in part.parameters():
            n = p.numel() * (tp if getattr(p, "tensor_model_parallel", False) else 1)
            trainable, frozen = (trainable + n, frozen) if p.requires_grad else (trainable, frozen + n)
        counts.append((label, trainable, frozen))
    return counts


def dataset_counts(dataset: Any) -> list[tuple[str, int]]:
    """(name, samples) of each dataset behind a training ``Dataset``: a NeVA dataset's annotation files (packed or
    not), a megatron-core blend's prefixes, or the dataset itself."""
    base = getattr(dataset, "base", dataset)  # PackedNevaDataset → its NevaDataset
    items = getattr(base, "items", None)
    if items is not None:
        return list(Counter(Path(str(item.record.source)).name for item in items).items())
    parts = getattr(dataset, "datasets", None)  # megatron-core BlendedDataset
    if parts:
        return [(Path(str(getattr(d, "dataset_path", type(d).__name__))).name, len(d)) for d in parts]
    name = getattr(dataset, "dataset_path", None) or type(dataset).__name__
    return [(Path(str(name)).name, len(dataset))]


def _part(label: str, trainable: int, frozen: int) -> str:
    state = "trains" if not frozen else "frozen" if not trainable else f"{count(trainable)} of them train"
    return f"{label} {count(trainable + frozen)} ({state})"


#: What each engine precision trains.
PRECISION_TEXT = {"32": "fp32", "bf16": "bf16 (bf16 weights, fp32 master weights)",
                  "fp16": "fp16 (fp16 weights, fp32 master weights, dynamic loss scaling)"}  # fmt: skip


def _optimizer(module: Any) -> str:
    optim, sched = getattr(module, "optim", None), getattr(module, "sched", None)
    if optim is None:
        return "optimizer: the module's own"
    rates = [f"lr {optim.lr:g}"] + [f"{part} {lr:g}" for part, lr in
                                    (("LLM", optim.llm_lr), ("projector", optim.projector_lr),
                                     ("vision tower", optim.vision_lr)) if lr is not None]  # fmt: skip
    text = f"optimizer {optim.name} ({', '.join(rates)}, weight decay {optim.weight_decay:g})"
    if sched is not None:
        text += (f", cosine schedule: warmup {sched.warmup_steps} steps, constant {sched.constant_steps}, "
                 f"min_lr {sched.min_lr:g}")  # fmt: skip
    return text


def start_text(trainer: Any, module: Any, settings: Any, run: RunInfo | None, log_dir: Path, *,
               dataset: Any = None, checkpoints: Any = None) -> str:  # fmt: skip
    """The start-of-run summary (see the module docstring); ``checkpoints`` is the run's ``PeriodicCheckpoint``."""
    tp, pp = settings.tensor_model_parallel_size, settings.pipeline_model_parallel_size
    world = int(getattr(trainer, "world_size", 1) or 1)
    dp = max(1, world // (tp * pp))
    accumulate = settings.global_batch_size // max(1, settings.micro_batch_size * dp)
    step, steps = trainer.global_step, trainer.max_steps
    head = f"run {run.name}: {run.stage}" if run else "training run"
    head += f", resuming at step {step} of {steps}" if step else f", {steps} optimizer steps"
    lines = [head]
    model = getattr(module, "model", None)
    if model is not None:
        counts = part_counts(model, tp)
        parts = ", ".join(_part(label, t, f) for label, t, f in counts)
        trainable, total = sum(t for _, t, _ in counts), sum(t + f for _, t, f in counts)
        where = f" (pipeline stage 1 of {pp})" if pp > 1 else ""
        lines.append(f"model{where}: {parts}; {count(trainable)} of {count(total)} parameters train")
    if run is not None and run.vocab_size:
        lines.append(f"vocabulary: {run.vocab_size} tokens; guessing uniformly gives loss ln({run.vocab_size}) = "
                     f"{math.log(run.vocab_size):.2f}")  # fmt: skip
    lines.append(f"parallel: TP {tp} × PP {pp} × DP {dp} = {world} process{'es' if world != 1 else ''}")
    lines.append(f"batch: micro {settings.micro_batch_size} × accumulation {accumulate} × DP {dp} = global "
                 f"{settings.global_batch_size} samples per step")  # fmt: skip
    if dataset is not None:
        sets = dataset_counts(dataset)
        listed = ", ".join(f"{name} {count(n)}" for name, n in sets)
        listed = f"{listed} samples" if len(sets) == 1 else f"{listed} ({count(sum(n for _, n in sets))} samples)"
        rows = len(dataset)
        packed = f", packed into {count(rows)} rows" if hasattr(dataset, "base") else ""
        seen = steps * settings.global_batch_size
        what = "rows" if packed else "samples"
        epochs = f" = {seen / rows:.2f} epochs" if rows and run is not None and run.kind == "neva" else ""
        lines.append(f"data: {listed}{packed}; {steps} steps × {settings.global_batch_size} = {count(seen)} "
                     f"{what}{epochs}")  # fmt: skip
    lines.append(f"precision {PRECISION_TEXT.get(settings.precision, settings.precision)}; {_optimizer(module)}")
    lines.append(f"logs: {log_dir} (loss.csv, loss.png, csv/, tensorboard/)")
    if checkpoints is not None:
        every = f"every {checkpoints.every} steps and at the end" if checkpoints.every > 0 else "at the end"
        keep = f", keeping the newest {checkpoints.keep}" if checkpoints.keep > 0 else ""
        lines.append(f"checkpoints: {checkpoints.dirpath} {every}{keep}" if checkpoints.keep != 0 else
                     "checkpoints: none (exp_manager.save_top_k 0: the run cannot be resumed)")  # fmt: skip
    if run is not None and run.nemo is not None:
        lines.append(f"final model: {run.nemo}")
    return "\n  ".join(lines)


def next_commands(run: RunInfo, nemo: Path) -> list[str]:
    """The commands to run on a finished run's ``.nemo``."""
    if run.kind == "text":
        return [f"neva convert nemo-to-hf --input {nemo} --output {run.name}-hf"]
    folder = run.image_folder or "IMAGES"
    commands = [f"neva eval --model {nemo} --data HELDOUT.json --image-folder {folder}",
                f"neva export hf-llava --input {nemo} --output {run.name}-hf"]  # fmt: skip
    if run.stage.startswith("NeVA stage 1"):
        commands.insert(0, f"neva train STAGE2.yaml model.mm_cfg.pretrain_mm_mlp_adapter={nemo}  # stage 2")
    return commands


def end_text(run: RunInfo | None, *, step: int, max_steps: int, start_step: int, seconds: float,
             rows: Sequence[Any], nemo: Path | None, log_dir: Path,
             val: Sequence[tuple[int, float]] = ()) -> str:  # fmt: skip
    """The end-of-run summary: ``rows`` are the run's ``loss.csv`` rows (``LossRow``), ``val`` its validation losses."""
    name = f"{run.name} " if run else ""
    state = "finished" if step >= max_steps else f"stopped at step {step} of {max_steps} (run it again to resume)"
    head = f"{name}{state}: {step} steps, {step - start_step} in this session ({duration(seconds)})"
    lines = [head]
    if rows:
        best = min(rows, key=lambda r: r.loss)
        losses = f"training loss {rows[-1].loss:.4f} at step {rows[-1].step}, best {best.loss:.4f} at step {best.step}"
        if run is not None and run.vocab_size:
            losses += f" (uniform guess ln({run.vocab_size}) = {math.log(run.vocab_size):.2f})"
        lines.append(losses)
    if val:
        low = min(val, key=lambda sv: sv[1])
        lines.append(f"validation loss {val[-1][1]:.4f} at step {val[-1][0]}, best {low[1]:.4f} at step {low[0]}")
    lines.append(f"loss curve: {log_dir / 'loss.png'} (data: loss.csv)")
    if nemo is not None:
        lines.append(f"final model: {nemo}")
        if run is not None:
            lines.extend(f"next: {command}" for command in next_commands(run, nemo))
    return "\n  ".join(lines)


def log_lines(text: str, log: logging.Logger = logger) -> None:
    """Log a summary one INFO line each (every line of a log file then says what it is)."""
    for line in text.splitlines():
        log.info("%s", line)


class RunSummary(pl.Callback):
    """Logs :func:`start_text` on global rank 0 when training starts; keeps the start step and time for the end."""

    def __init__(self, settings: Any, run: RunInfo | None, log_dir: Path,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.settings, self.run, self.log_dir, self.clock = settings, run, Path(log_dir), clock
        self.start_step, self.started = 0, clock()

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        from neva_tools.train.fit import PeriodicCheckpoint

        self.start_step, self.started = trainer.global_step, self.clock()
        if not trainer.is_global_zero:
            return
        loader = getattr(trainer, "train_dataloader", None)
        checkpoints = next((c for c in trainer.callbacks if isinstance(c, PeriodicCheckpoint)), None)
        text = start_text(trainer, module, self.settings, self.run, self.log_dir,
                          dataset=getattr(loader, "dataset", None), checkpoints=checkpoints)  # fmt: skip
        log_lines(text)

    def elapsed(self) -> float:
        """Seconds since training started."""
        return self.clock() - self.started
