"""The Lightning module that trains a megatron-core NeVA (or GPT) model with megatron-core's optimizer.

``configure_model`` (once the strategy has set up megatron's parallel groups) builds the model and wraps it for
training (:func:`~neva_tools.train.megatron_optim.wrap_model`: ``Float16Module`` for bf16/fp16 weights, then
megatron-core's ``DistributedDataParallel`` with fp32 gradient buffers over the data-parallel group);
``configure_optimizers`` builds megatron-core's optimizer (``fused_adam`` or ``distributed_fused_adam``; fp32 master
weights for 16-bit weights, gradient clipping by the tensor- and data-parallel-global norm, the part learning rates)
with NeMo's CosineAnnealing schedule (one ``LambdaLR`` per inner optimizer, stepped every optimizer step, also when
an fp16 step is skipped on overflow: the rate follows ``trainer.global_step``). Lightning runs in manual
optimization: every ``training_step`` is one micro-batch; gradients accumulate (without data-parallel sync) until
the last micro-batch of the optimizer step, which syncs them and steps the optimizer and the schedulers, and counts
one optimizer step in ``trainer.global_step``.

Pipeline parallelism (``pipeline_model_parallel_size`` > 1, optionally interleaved): the model is this rank's stage
(or its list of virtual-stage chunks, each wrapped in megatron-core's DDP; ``model`` is then a
:class:`~neva_tools.train.pipeline.PipelineChunks`), and one optimizer step is one call of megatron-core's schedule
(:func:`neva_tools.train.pipeline.train_step`) over the step's micro-batches. Lightning still hands the module one
micro-batch per ``training_step`` (so the data loaders, samplers, resume positions and callbacks are the same as
without pipelining): the module keeps the micro-batches of the current step and runs the schedule on the last one;
the steps before it return no loss. ``forward_fn`` (:data:`~neva_tools.train.pipeline.StageForward`) is the stage's
forward: :func:`llava_forward` for NeVA, ``neva_tools.train.text.gpt_forward`` for a text GPT. Without pipelining the
module keeps its one-micro-batch-per-step path (identical numbers to before; the pipelined path is tested against
it).

The loss is the token-mean cross-entropy over supervised positions of the micro-batch. Per optimizer step it logs
``train_loss`` (the mean over the step's micro-batches), ``grad_norm`` (before clipping), ``lr_<part>``,
``tokens_per_s``, ``samples_per_s``, ``supervised_tokens`` (and ``loss_scale`` for fp16) every ``log_every_n_steps``
optimizer steps, at the optimizer step.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch

from neva_tools.data.packing import packed_attention_mask
from neva_tools.data.templates import IGNORE_INDEX
from neva_tools.train.optim import OptimSettings
from neva_tools.train.pipeline import StageForward, masked_mean


@dataclass(frozen=True)
class ScheduleSettings:
    """NeMo's ``optim.sched`` (CosineAnnealing)."""

    max_steps: int
    warmup_steps: int = 0
    constant_steps: int = 0
    min_lr: float = 0.0


def unwrap(model: Any) -> Any:
    """The megatron-core model inside the training wrappers (megatron-core or torch DDP, ``Float16Module``)."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import Float16Module

    while isinstance(model, (DistributedDataParallel, Float16Module, torch.nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


def _llava_outputs(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's output for a collated batch (the per-token loss, or on a pipeline stage before the last one its
    hidden states) and the image-expanded loss mask (None before the last stage)."""
    inner = unwrap(model)
    labels = batch["labels"]
    loss_mask = batch.get("loss_mask", (labels != -100).float())
    attention_mask = batch.get("attention_mask")
    cu_seqlens = batch.get("cu_seqlens") or []
    tiles = batch.get("num_image_tiles")
    if attention_mask is None and any(cu is not None for cu in cu_seqlens):
        widths = batch.get("image_tokens")  # each image's embeddings (AnyRes: per image), else tiles × img_seq_len
        if widths is None:
            widths = inner.img_seq_len if tiles is None else tiles * inner.img_seq_len
        attention_mask = packed_attention_mask(batch["input_ids"], cu_seqlens, widths,
                                               inner.image_token_index)  # fmt: skip
        # LLaVAModel cuts the combined rows (padding included) at the LLM's maximum length; cut the mask alike
        limit = inner._language_max_sequence_length
        attention_mask = attention_mask[..., :limit, :limit]
        if inner._language_is_pipeline_parallel:  # and pads them to it: the stages exchange fixed-size activations
            attention_mask = pad_attention_mask(attention_mask, limit)
    out, new_mask = model(
        batch["images"],
        batch["input_ids"],
        batch["position_ids"],
        attention_mask,
        labels=torch.where(loss_mask > 0, labels, IGNORE_INDEX),  # no logits where there is no loss
        loss_mask=loss_mask,
        num_image_tiles=tiles,
        **({"image_sizes": batch["image_sizes"]} if "image_sizes" in batch else {}),
    )
    return out, new_mask


def pad_attention_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    """A ``[b, 1, S, S]`` mask (True = masked) grown to ``length``: the added positions (padding) attend causally to
    each other only, so no query row is fully masked."""
    size = mask.shape[-1]
    if size >= length:
        return mask
    out = torch.ones(*mask.shape[:-2], length, length, dtype=mask.dtype, device=mask.device)
    out[..., :size, :size] = mask
    pad = torch.ones(length - size, length - size, dtype=torch.bool, device=mask.device).tril()
    out[..., size:, size:] = ~pad
    return out


def _unused_vision_term(model: Any, batch: dict[str, Any], like: torch.Tensor) -> torch.Tensor | None:
    """For a batch without images (text-only records) in training: a zero-weighted sum of the trainable vision and
    projector parameters, so that data-parallel gradient sync sees the same parameters used on every rank."""
    inner = unwrap(model)
    if len(batch["images"]) or not torch.is_grad_enabled():
        return None
    unused = [p for part in (inner.vision_projection, inner.vision_model) if part is not None
              for p in part.parameters() if p.requires_grad]  # fmt: skip
    return sum((0.0 * p.sum() for p in unused), torch.zeros((), device=like.device)) if unused else None


def llava_loss(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss over supervised tokens, number of supervised tokens) for a collated batch.

    Packed rows (``cu_seqlens`` from ``PackedNevaDataset``) get a block-diagonal causal mask in the
    image-expanded space, so samples never attend to each other. A batch without images (text-only records)
    still touches the trainable vision parameters with a zero-weighted term, so data-parallel gradient sync
    sees the same parameters used on every rank.
    """
    out, new_mask = _llava_outputs(model, batch)
    loss, tokens = masked_mean(out, new_mask)
    unused = _unused_vision_term(model, batch, loss)
    return (loss if unused is None else loss + unused), tokens


def llava_forward(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A NeVA pipeline stage's forward (:data:`~neva_tools.train.pipeline.StageForward`): the stage's output and,
    on the last stage, the image-expanded loss mask; the first stage adds the zero-weighted term of
    :func:`llava_loss` for batches without images."""
    out, new_mask = _llava_outputs(model, batch)
    unused = _unused_vision_term(model, batch, out) if unwrap(model).add_encoder else None
    return (out if unused is None else out + unused), new_mask


LossFn = Callable[[Any, dict[str, Any]], tuple[torch.Tensor, torch.Tensor]]


class NevaModule(pl.LightningModule):
    """Trains the model returned by ``build_model`` (called once the parallel groups exist); see the module docstring.

    The trainer's strategy supplies precision, gradient clipping and accumulation
    (:class:`~neva_tools.train.strategy.EngineSettings`); ``optim`` the optimizer (``optim.name``, overlap options,
    part learning rates) and ``sched`` the schedule. After ``configure_model``: ``model`` is the megatron-core model
    (what checkpoints and ``.nemo`` files hold; 16-bit weights under bf16/fp16), ``chunks`` its training wrappers
    (call ``chunk``); after ``configure_optimizers``: ``optimizer`` (megatron-core's) and ``schedulers``.
    """

    def __init__(
        self,
        build_model: Callable[[], torch.nn.Module | list[torch.nn.Module]],
        optim: OptimSettings,
        sched: ScheduleSettings,
        loss_fn: LossFn = llava_loss,
        loader: Callable[[], Any] | None = None,
        forward_fn: StageForward = llava_forward,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False  # megatron-core's optimizer is stepped in training_step
        self.build_model, self.optim, self.sched, self.loss_fn = build_model, optim, sched, loss_fn
        self.forward_fn = forward_fn  # a pipeline stage's forward (pipeline parallelism)
        self.pipelined = False  # set by configure_model: more than one pipeline stage
        self._batches: list[dict[str, Any]] = []  # the current optimizer step's micro-batches (pipelined)
        self.loader = loader  # built lazily: the data-parallel rank is known only once training starts
        self.model: torch.nn.Module | None = None
        self.chunks: list[Any] = []  # a plain list: the chunks hold ``model``, registered once above
        self.optimizer: Any = None
        self.schedulers: list[torch.optim.lr_scheduler.LambdaLR] = []
        self.accumulate = 1
        self.last_loss: torch.Tensor | None = None
        self._micro = 0  # micro-batches of the current optimizer step done so far
        self._sums: dict[str, Any] = {}  # the current optimizer step's sums, for logging
        self._step_start = time.perf_counter()

    @property
    def chunk(self) -> Any:
        """The wrapped model to call in training and evaluation (megatron-core DDP around ``Float16Module``)."""
        return self.chunks[0]

    def configure_model(self) -> None:
        from neva_tools.train import megatron_optim as mo
        from neva_tools.train.strategy import EngineSettings

        if self.model is not None:
            return
        from neva_tools.train.pipeline import PipelineChunks, is_pipelined

        engine = getattr(self.trainer.strategy, "engine", None) or EngineSettings()
        self.accumulate = engine.accumulate
        self.pipelined = is_pipelined()
        built = self.build_model()
        models = list(built) if isinstance(built, list | tuple) else [built]  # interleaved: one per virtual stage
        self.model = models[0] if len(models) == 1 else PipelineChunks(models)
        self.chunks = [chunk for model in models
                       for chunk in mo.wrap_model(model, precision=engine.precision,
                                                  use_distributed_optimizer=mo.uses_distributed_optimizer(self.optim.name),
                                                  overlap_grad_reduce=self.optim.overlap_grad_reduce,
                                                  overlap_param_gather=self.optim.overlap_param_gather)]  # fmt: skip

    def configure_optimizers(self) -> None:
        """Build megatron-core's optimizer and the schedulers (once); return None: Lightning gets no optimizer.

        Called by :class:`~neva_tools.train.strategy.MegatronStrategy` after the model was set up, outside
        Lightning's default-device context (megatron-core's CPU type checks do not work inside it).
        """
        from neva_tools.train import megatron_optim as mo
        from neva_tools.train.strategy import EngineSettings

        if self.optimizer is not None:
            return
        engine = getattr(self.trainer.strategy, "engine", None) or EngineSettings()
        self.optimizer = mo.build_optimizer(self.chunks, self.optim, name=self.optim.name, clip_grad=engine.clip_grad,
                                            min_lr=self.sched.min_lr, initial_loss_scale=engine.initial_loss_scale,
                                            loss_scale_window=engine.loss_scale_window,
                                            hysteresis=engine.hysteresis)  # fmt: skip
        self.schedulers = mo.cosine_annealing(self.optimizer, max_steps=self.sched.max_steps, min_lr=self.sched.min_lr,
                                              warmup_steps=self.sched.warmup_steps,
                                              constant_steps=self.sched.constant_steps)  # fmt: skip

    def train_dataloader(self) -> Any:
        if self.loader is None:
            raise RuntimeError("pass a DataLoader to Trainer.fit or a loader factory to NevaModule")
        return self.loader()

    def gather_weights(self) -> None:
        """Make ``model``'s weights current before reading them (with ``overlap_param_gather``; else a no-op)."""
        from neva_tools.train.megatron_optim import gather_params

        gather_params(self.chunks)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        from neva_tools.train import megatron_optim as mo

        if self.pipelined:
            return self._pipelined_step(batch)
        last = self._micro == self.accumulate - 1
        if self._micro == 0:
            mo.zero_grad(self.chunks, self.optimizer)
            self._sums = {"loss": 0.0, "tokens": 0, "samples": 0, "supervised": 0.0}
        with contextlib.nullcontext() if last else self.chunk.no_sync():  # sync the gradients on the last only
            loss, tokens = self.loss_fn(self.chunk, batch)
            self.manual_backward(mo.scale_loss(self.optimizer, loss / self.accumulate))
        self.last_loss = loss.detach()  # the micro-batch's loss (what the loss curve shows)
        step = self._sums
        step["loss"] = step["loss"] + self.last_loss
        step["tokens"] += batch["input_ids"].numel()
        step["samples"] += len(batch["input_ids"])
        step["supervised"] = step["supervised"] + tokens.detach().float()
        self._micro = 0 if last else self._micro + 1
        if last:
            lrs = {f"lr_{group.get('part', 'all')}": group["lr"] for group in self.optimizer.param_groups}
            result = mo.optimizer_step(self.chunks, self.optimizer)
            for scheduler in self.schedulers:
                scheduler.step()
            self._count_optimizer_step()
            self._log_step(result, lrs)
        return self.last_loss

    def _pipelined_step(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """Keep ``batch``; on the step's last micro-batch run megatron-core's schedule over them and step."""
        from neva_tools.train import pipeline

        if self._micro == 0:
            self._batches = []
        self._batches.append(batch)
        self.last_loss = None  # the curve gets the step's mean loss at its last micro-batch
        if self._micro < self.accumulate - 1:
            self._micro += 1
            return None
        self._micro = 0
        batches, self._batches = self._batches, []
        lrs = {f"lr_{group.get('part', 'all')}": group["lr"] for group in self.optimizer.param_groups}
        losses, result = pipeline.train_step(self.chunks, self.optimizer, batches, self.forward_fn)
        for scheduler in self.schedulers:
            scheduler.step()
        self.last_loss = losses.losses.mean()
        self._sums = {"loss": losses.losses.sum(), "tokens": sum(b["input_ids"].numel() for b in batches),
                      "samples": sum(len(b["input_ids"]) for b in batches),
                      "supervised": losses.tokens.sum()}  # fmt: skip
        self._count_optimizer_step()
        self._log_step(result, lrs)
        return self.last_loss

    def _count_optimizer_step(self) -> None:
        """One optimizer step for ``trainer.global_step`` (what Lightning does around a ``LightningOptimizer.step``
        in manual optimization), so ``max_steps``, checkpoint names and resume count optimizer steps."""
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        progress.increment_ready()
        progress.increment_completed()

    def _log_step(self, result: Any, lrs: dict[str, float]) -> None:
        now = time.perf_counter()
        elapsed, self._step_start = max(now - self._step_start, 1e-9), now
        step, trainer = self._sums, self.trainer
        mean_loss = step["loss"] / self.accumulate
        self.log("train_loss", mean_loss, prog_bar=True, logger=False, on_step=True, batch_size=step["samples"])
        if trainer.global_step % max(1, trainer.log_every_n_steps) and trainer.global_step != trainer.max_steps:
            return
        metrics = {
            "train_loss": float(mean_loss),
            "tokens_per_s": step["tokens"] / elapsed,
            "samples_per_s": step["samples"] / elapsed,
            "supervised_tokens": float(step["supervised"]),
            **lrs,
        }
        if result.grad_norm is not None:  # None: an fp16 step skipped on overflow
            metrics["grad_norm"] = result.grad_norm
        if self.optimizer.config.fp16:
            metrics["loss_scale"] = float(self.optimizer.get_loss_scale())
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["neva_schedulers"] = [scheduler.state_dict() for scheduler in self.schedulers]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        for scheduler, state in zip(self.schedulers, checkpoint.get("neva_schedulers", []), strict=False):
            scheduler.load_state_dict(state)
