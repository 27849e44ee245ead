"""megatron-core's own data-parallel wrapper and optimizers, for the trainer.

* :func:`wrap_model`: ``Float16Module`` for bf16/fp16 weights, then megatron-core's ``DistributedDataParallel``
  (contiguous fp32 gradient buffers, bucketed and optionally overlapped reduction; with the distributed optimizer
  a reduce-scatter and a parameter all-gather instead of an all-reduce);
* :func:`build_optimizer`: ``get_megatron_optimizer`` with fp32 master weights for 16-bit parameters, its
  tensor-parallel-aware gradient-norm clipping, dynamic loss scaling for fp16, no state for frozen parameters,
  and the part learning rates of :class:`~neva_tools.train.optim.OptimSettings` (projector, vision encoder, LLM)
  set through megatron-core's ``config_overrides`` (``ParamKey`` -> param-group override);
* :func:`zero_grad`, :func:`scale_loss`, :func:`optimizer_step`: one training step; :func:`gather_params` before
  evaluating or saving with ``overlap_param_gather``;
* :func:`cosine_annealing`: NeMo's schedule on the optimizer's param groups; :func:`optimizer_state_bytes`:
  what the optimizer holds on this rank, measured on its tensors.

One step (Lightning: ``automatic_optimization = False`` and this in ``training_step``)::

    chunks = wrap_model(model, precision="bf16", use_distributed_optimizer=True, overlap_grad_reduce=True)
    optimizer = build_optimizer(chunks, settings, name="distributed_fused_adam", clip_grad=1.0)
    schedulers = cosine_annealing(optimizer, max_steps=1000, min_lr=1e-6)

    zero_grad(chunks, optimizer)
    loss = loss_fn(chunks[0], batch)             # the DDP chunk is the model to call
    scale_loss(optimizer, loss).backward()       # for gradient accumulation: chunk.no_sync() on all but the last
    result = optimizer_step(chunks, optimizer)   # finish_grad_sync, then unscale/clip/step (skipped on fp16 overflow)
    for scheduler in schedulers:
        scheduler.step()

On CPU the megatron-core patches of :mod:`neva_tools.model.cpu_compat` must be applied (``init_distributed`` does).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from neva_tools.errors import NevaError
from neva_tools.train.optim import PARTS, OptimSettings, _no_decay, part_of
from neva_tools.train.schedule import check_schedule, cosine_annealing_lr

if TYPE_CHECKING:
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer import MegatronOptimizer

logger = logging.getLogger(__name__)

#: ``precision`` values of :func:`wrap_model` and the parameter dtype each gives.
PRECISIONS: dict[str, torch.dtype] = {"32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: NeMo ``optim.name`` values and whether each shards optimizer state over the data-parallel group.
OPTIMIZER_NAMES: dict[str, bool] = {"fused_adam": False, "distributed_fused_adam": True}


def uses_distributed_optimizer(name: str) -> bool:
    """Whether the optimizer ``name`` (NeMo's ``optim.name``) shards its state; raises ``NevaError`` if unknown."""
    if name not in OPTIMIZER_NAMES:
        raise NevaError(f"optim.name is {name!r}; valid names: {', '.join(OPTIMIZER_NAMES)}")
    return OPTIMIZER_NAMES[name]


def wrap_model(
    model: torch.nn.Module,
    *,
    precision: str = "32",
    use_distributed_optimizer: bool = False,
    overlap_grad_reduce: bool = False,
    overlap_param_gather: bool = False,
    bucket_size: int | None = None,
) -> list[DistributedDataParallel]:
    """Wrap a megatron-core model for training: the model chunks to pass to :func:`build_optimizer`.

    ``precision`` is ``"32"`` (fp32 weights) or ``"bf16"``/``"fp16"`` (``Float16Module`` casts the weights, in place,
    and the float inputs, and returns fp32 outputs; build the model in fp32 or in that dtype). Gradients are accumulated
    and reduced in fp32 (``grad_reduce_in_fp32``) and averaged over the data-parallel group.
    ``use_distributed_optimizer`` must match the optimizer (see :func:`uses_distributed_optimizer`).
    ``overlap_grad_reduce`` starts each bucket's reduction during backward; ``overlap_param_gather`` (distributed
    optimizer only) all-gathers updated weights during the next forward. ``bucket_size`` is in elements (megatron-core's
    default: max(4e7, 1e6 × DP size); only used with ``overlap_grad_reduce``). Parameters are broadcast from
    data-parallel rank 0, so all replicas start equal. Needs megatron's parallel state
    (``neva_tools.model.parallel.init_distributed``).
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module
    from megatron.core.utils import get_model_config

    if precision not in PRECISIONS:
        raise NevaError(f"precision is {precision!r}; valid values: {', '.join(PRECISIONS)}")
    if overlap_param_gather and not use_distributed_optimizer:
        raise NevaError("overlap_param_gather needs the distributed optimizer (optim.name: distributed_fused_adam)")
    if bucket_size is not None and bucket_size < 1:
        raise NevaError(f"bucket_size ({bucket_size}) must be a positive number of elements, or None")
    dtype = PRECISIONS[precision]
    dtypes = {p.dtype for p in model.parameters()}
    if precision == "32" and dtypes != {torch.float32}:
        found = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        raise NevaError(f"precision is '32' but the model's parameters are {found}; build the model in float32")

    config = get_model_config(model)
    if precision != "32":
        if (config.bf16, config.fp16) != (precision == "bf16", precision == "fp16"):
            config = copy.copy(config)  # Float16Module reads the precision from the config; leave the model's alone
            config.bf16, config.fp16 = precision == "bf16", precision == "fp16"
        model = Float16Module(config, model)
        assert all(p.dtype == dtype for p in model.parameters())
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather,
        use_distributed_optimizer=use_distributed_optimizer,
        bucket_size=bucket_size,
    )
    chunk = DistributedDataParallel(config, ddp_config, model)
    chunk.broadcast_params()
    return [chunk]


def _precision_of(chunks: list[DistributedDataParallel]) -> str:
    from megatron.core.transformer.module import Float16Module

    inner = chunks[0].module
    if isinstance(inner, Float16Module):
        return "bf16" if inner.bf16 else "fp16"
    return "32"


def _plain_name(name: str) -> str:
    """A parameter name without the ``module.`` prefixes of the DDP and ``Float16Module`` wrappers."""
    while name.startswith("module."):
        name = name[len("module.") :]
    return name


def param_group_overrides(settings: OptimSettings, *, min_lr: float = 0.0) -> dict[Any, dict[str, Any]]:
    """megatron-core ``config_overrides`` giving the part rates and the no-decay rule of ``settings``.

    Every parameter's group gets ``part`` (``projector``, ``vision`` or ``llm``, from its name as in
    :func:`neva_tools.train.optim.part_of`); a part with its own rate also gets ``lr``/``max_lr`` = that rate and
    ``min_lr`` = ``min_lr`` × rate / ``settings.lr`` (megatron-core's ``OptimizerParamScheduler`` reads ``max_lr``
    and ``min_lr``; torch's optimizer and :func:`cosine_annealing` read ``lr``). Norms, biases and other 1-D
    parameters get ``weight_decay`` 0 and ``wd_mult`` 0 unless ``settings.decay_norms_and_biases``.
    """
    from megatron.core.optimizer import ParamKey
    from megatron.core.optimizer.optimizer_config import ParamWithNamePredicate

    rates = {"projector": settings.projector_lr, "vision": settings.vision_lr, "llm": settings.llm_lr}
    overrides: dict[Any, dict[str, Any]] = {}
    for part in PARTS:
        predicate = ParamWithNamePredicate(
            name=f"neva_part_{part}", fn=lambda param, name, part=part: part_of(_plain_name(name)) == part
        )
        override: dict[str, Any] = {"part": part}
        rate = rates[part]
        if rate is not None:
            override.update(lr=rate, max_lr=rate, min_lr=min_lr * rate / settings.lr if settings.lr else min_lr)
        overrides[ParamKey(with_name_predicate=predicate)] = override
    if not settings.decay_norms_and_biases:
        predicate = ParamWithNamePredicate(
            name="neva_no_weight_decay", fn=lambda param, name: _no_decay(_plain_name(name), param)
        )
        overrides[ParamKey(with_name_predicate=predicate)] = {"weight_decay": 0.0, "wd_mult": 0.0}
    return overrides


def build_optimizer(
    chunks: list[DistributedDataParallel],
    settings: OptimSettings,
    *,
    name: str = "fused_adam",
    clip_grad: float = 1.0,
    min_lr: float = 0.0,
    initial_loss_scale: float = 2.0**32,
    min_loss_scale: float = 1.0,
    loss_scale_window: int = 1000,
    hysteresis: int = 2,
) -> MegatronOptimizer:
    """megatron-core's Adam (AdamW-style decoupled weight decay) over the trainable parameters of ``chunks``.

    ``name`` is NeMo's ``optim.name``: ``fused_adam`` keeps the whole state on every data-parallel rank,
    ``distributed_fused_adam`` shards it (and the fp32 master weights) over the data-parallel group; the chunks must
    have been wrapped with the matching ``use_distributed_optimizer``. With 16-bit weights the optimizer keeps fp32
    master weights and steps those. ``clip_grad`` clips the global (tensor- and data-parallel) gradient L2 norm; 0
    turns clipping off. fp16 uses dynamic loss scaling (``initial_loss_scale``, halved after ``hysteresis`` overflowing
    steps, never below ``min_loss_scale``, doubled after ``loss_scale_window`` good ones). ``min_lr`` is only
    recorded in the param groups for megatron-core's ``OptimizerParamScheduler`` (see :func:`param_group_overrides`).
    With Transformer Engine or Apex installed megatron-core uses their fused Adam, else ``torch.optim.AdamW``.
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    distributed = uses_distributed_optimizer(name)
    wrapped = chunks[0].ddp_config.use_distributed_optimizer
    if wrapped != distributed:
        raise NevaError(
            f"optim.name {name!r} {'shards' if distributed else 'does not shard'} the optimizer state but the model "
            f"was wrapped with use_distributed_optimizer={wrapped}; pass use_distributed_optimizer={distributed} to "
            "wrap_model"
        )
    if not _trainable_anywhere(chunks):
        raise NevaError("the model has no trainable parameters: check the freeze settings")
    precision = _precision_of(chunks)
    config = OptimizerConfig(
        optimizer="adam",
        lr=settings.lr,
        min_lr=min_lr,
        weight_decay=settings.weight_decay,
        adam_beta1=settings.betas[0],
        adam_beta2=settings.betas[1],
        adam_eps=settings.eps,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        params_dtype=PRECISIONS[precision],
        use_distributed_optimizer=distributed,
        overlap_param_gather=chunks[0].ddp_config.overlap_param_gather,
        clip_grad=clip_grad,
        initial_loss_scale=initial_loss_scale,
        min_loss_scale=min_loss_scale,
        loss_scale_window=loss_scale_window,
        hysteresis=hysteresis,
    )
    return get_megatron_optimizer(config, list(chunks), config_overrides=param_group_overrides(settings, min_lr=min_lr))


def _trainable_anywhere(chunks: list[DistributedDataParallel]) -> bool:
    """Whether any pipeline stage has trainable parameters (a frozen LLM's later stages have none; they still take
    part in the optimizer's collectives)."""
    from megatron.core import parallel_state

    local = any(p.requires_grad for chunk in chunks for p in chunk.parameters())
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return local
    device = next(chunks[0].parameters()).device
    flag = torch.tensor([float(local)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX,
                                 group=parallel_state.get_pipeline_model_parallel_group())  # fmt: skip
    return bool(flag.item())


def torch_optimizers(optimizer: MegatronOptimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside a megatron-core optimizer (one per dense/expert part; none on a stub rank)."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [part.optimizer for part in parts if getattr(part, "optimizer", None) is not None]


def zero_grad(chunks: list[DistributedDataParallel], optimizer: MegatronOptimizer) -> None:
    """Start a step: zero the chunks' gradient buffers and the optimizer's main gradients."""
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()


def scale_loss(optimizer: MegatronOptimizer, loss: torch.Tensor) -> torch.Tensor:
    """``loss`` times the current loss scale (fp16 dynamic scaling; 1 otherwise): call ``backward()`` on this."""
    return loss * optimizer.get_loss_scale().to(loss.device).reshape(())


@dataclass(frozen=True)
class StepResult:
    """What megatron-core's ``optimizer.step()`` reports."""

    success: bool  # False when fp16 gradients overflowed: the step was skipped and the loss scale lowered
    grad_norm: float | None  # the global gradient L2 norm before clipping (None when skipped)
    num_zeros: int | None  # zero gradient entries, when counted (OptimizerConfig.log_num_zeros_in_grad)


def optimizer_step(chunks: list[DistributedDataParallel], optimizer: MegatronOptimizer) -> StepResult:
    """Finish the data-parallel gradient reduction of every chunk, then step the optimizer."""
    for chunk in chunks:
        chunk.finish_grad_sync()
    success, grad_norm, num_zeros = optimizer.step()
    return StepResult(
        success=bool(success),
        grad_norm=None if grad_norm is None else float(grad_norm),
        num_zeros=None if num_zeros is None else int(num_zeros),
    )


def gather_params(chunks: list[DistributedDataParallel]) -> None:
    """With ``overlap_param_gather``, all-gather the weights updated by the last step now (else the next forward
    does): call before evaluating, saving or reading the weights. A no-op otherwise."""
    for chunk in chunks:
        if chunk.ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


def cosine_annealing(
    optimizer: MegatronOptimizer, *, max_steps: int, min_lr: float, warmup_steps: int = 0, constant_steps: int = 0
) -> list[torch.optim.lr_scheduler.LambdaLR]:
    """NeMo's ``CosineAnnealing`` (:mod:`neva_tools.train.schedule`) on every param group, one scheduler per torch
    optimizer inside ``optimizer``; step them all once per optimizer step.

    Each group follows the curve from its own ``lr``; ``min_lr`` is scaled by ``group lr / optim lr`` (the
    optimizer's ``config.lr``), so a projector trained at 10× the LLM's rate also ends at 10× ``min_lr``.
    """
    base = optimizer.config.lr
    check_schedule(max_steps, warmup_steps, constant_steps, base, min_lr)
    floor = min_lr / base if base else 0.0

    def factor(step: int) -> float:
        return cosine_annealing_lr(step, max_lr=1.0, min_lr=floor, max_steps=max_steps, warmup_steps=warmup_steps,
                                   constant_steps=constant_steps)  # fmt: skip

    return [torch.optim.lr_scheduler.LambdaLR(inner, factor) for inner in torch_optimizers(optimizer)]


@dataclass(frozen=True)
class OptimizerStateBytes:
    """Bytes the optimizer holds on this rank, beyond the model's own parameters and gradient buffers."""

    moments: int  # the torch optimizer's per-parameter state (Adam: exp_avg, exp_avg_sq, step)
    main_params: int  # fp32 master copies of 16-bit parameters (shards of them with the distributed optimizer)

    @property
    def total(self) -> int:
        return self.moments + self.main_params


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def optimizer_state_bytes(optimizer: MegatronOptimizer, chunks: list[DistributedDataParallel]) -> OptimizerStateBytes:
    """Measure :class:`OptimizerStateBytes` on the tensors; Adam creates its state at the first step, so call after it.

    Parameters the optimizer steps that share storage with the model's (fp32 parameters, or their shards with the
    distributed optimizer) are not counted as master copies.
    """
    model_storages = {p.untyped_storage().data_ptr() for chunk in chunks for p in chunk.parameters()}
    moments = main_params = 0
    for inner in torch_optimizers(optimizer):
        for state in inner.state.values():
            moments += sum(_nbytes(v) for v in state.values() if isinstance(v, torch.Tensor))
        for group in inner.param_groups:
            for param in group["params"]:
                if param.untyped_storage().data_ptr() not in model_storages:
                    main_params += _nbytes(param)
    return OptimizerStateBytes(moments=moments, main_params=main_params)
