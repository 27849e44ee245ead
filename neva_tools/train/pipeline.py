"""Pipeline-parallel training steps through megatron-core's own schedules (``get_forward_backward_func``).

One optimizer step is one call of the schedule over the step's micro-batches (``num_microbatches`` = the gradient
accumulation count): 1F1B for ``pipeline_model_parallel_size`` > 1, the interleaved 1F1B schedule with
``virtual_pipeline_model_parallel_size`` (one model chunk per virtual stage, each wrapped in megatron-core's
``DistributedDataParallel``). Every stage of a data-parallel rank reads the same micro-batches: the first stage
embeds them (NeVA: vision encoder and projector too, as megatron-core's ``LLaVAModel`` places them), the last one
needs their labels and loss masks; activations travel between stages as ``[seq, micro batch, hidden]`` tensors
whose sequence length is fixed per run (:func:`sequence_length`).

The loss is computed on the last stage: the token-mean cross-entropy of each micro-batch, divided by the number of
micro-batches by the schedule (as the accumulated step does without pipelining), times the fp16 loss scale
(``config.grad_scale_func``). After the backward passes the schedule calls megatron-core's
``finalize_model_grads`` (the data-parallel gradient reduction of every chunk, and the all-reduce of the tied word
embedding's gradients between the first and the last stage); then megatron-core's optimizer clips by the gradient
norm over all stages (its model-parallel group) and steps. The micro-batch losses are broadcast from the last stage
to the other stages of the pipeline, so every rank can log them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from neva_tools.errors import NevaError

#: ``(model chunk, micro-batch) -> (output, loss mask)``: the stage's output (the last stage: the per-token loss
#: ``[b, s]``; the others: hidden states ``[s, b, h]``) and, on the last stage, the mask the loss is averaged with.
StageForward = Callable[[Any, dict[str, Any]], tuple[torch.Tensor, torch.Tensor | None]]


class PipelineChunks(torch.nn.ModuleList):
    """The interleaved model chunks of one rank, as one module for checkpoints: ``sharded_state_dict`` holds every
    chunk's tensors under their global keys (layer numbers with the chunk's offset), so a checkpoint resumes at
    another TP/PP/virtual size; ``state_dict`` keys are ``<chunk>.<key>``."""

    def sharded_state_dict(self, prefix: str = "", **kwargs: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for index, chunk in enumerate(self):
            for key, value in chunk.sharded_state_dict(prefix=prefix, **kwargs).items():
                out[f"{prefix}{index}.{key.removeprefix(prefix)}"] = value  # dict keys only; tensor keys are global
        return out


def is_pipelined() -> bool:
    """Whether megatron's parallel state has more than one pipeline stage."""
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_world_size() > 1


def masked_mean(output: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean of ``output`` over the positions where ``mask`` is set, number of those positions)."""
    tokens = mask.sum()
    return (output.float() * mask).sum() / tokens.clamp(min=1), tokens


def configure(chunks: list[Any], optimizer: Any) -> None:
    """Set the hooks megatron-core's schedules read from the first chunk's config (as megatron-core's ``training.py``
    does): no gradient sync until the last micro-batch, ``finalize_model_grads`` after the backward passes, the fp16
    loss scale, the dtype of the activations the stages exchange, and with ``overlap_grad_reduce``/
    ``overlap_param_gather`` the per-chunk sync hooks."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.utils import get_model_config

    config = get_model_config(chunks[0])

    def one_or_list(hooks: list[Callable[..., Any]]) -> Any:
        return hooks[0] if len(hooks) == 1 else hooks

    config.no_sync_func = one_or_list([chunk.no_sync for chunk in chunks])
    ddp = chunks[0].ddp_config
    config.grad_sync_func = one_or_list([c.start_grad_sync for c in chunks]) if ddp.overlap_grad_reduce else None
    config.param_sync_func = one_or_list([c.start_param_sync for c in chunks]) if ddp.overlap_param_gather else None
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss if optimizer is not None else None
    # the activations' dtype: the weights' (bf16/fp16 under Float16Module, which casts a model built in fp32)
    config.pipeline_dtype = next(chunks[0].parameters()).dtype


def sequence_length(chunk: Any, batch: dict[str, Any]) -> int:
    """The sequence length of the activations between stages: a NeVA LLM's maximum length (``LLaVAModel`` pads the
    image-expanded rows to it under pipeline parallelism), else the text batch's length."""
    from neva_tools.train.module import unwrap

    inner = unwrap(chunk)
    if hasattr(inner, "image_token_index"):  # LLaVAModel
        return int(inner._language_max_sequence_length)
    return int(batch["input_ids"].shape[1])


@dataclass(frozen=True)
class StepLosses:
    """The micro-batch losses of one schedule call, on every stage of the pipeline."""

    losses: torch.Tensor  # [micro-batches]: each one's token-mean loss
    tokens: torch.Tensor  # [micro-batches]: each one's supervised tokens


def run_schedule(chunks: list[Any], batches: list[dict[str, Any]], forward: StageForward, *,
                 forward_only: bool = False) -> StepLosses:  # fmt: skip
    """Run megatron-core's schedule over ``batches`` (one per micro-batch) on this rank's ``chunks``; with
    ``forward_only`` no gradients. Returns the micro-batch losses, broadcast from the last stage."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from neva_tools.train.module import unwrap

    llava = hasattr(unwrap(chunks[0]), "image_token_index")  # LLaVAModel pads every row to one length itself
    sizes = {tuple(b["input_ids"].shape[: 1 if llava else 2]) for b in batches}
    if len(sizes) != 1:
        raise NevaError(f"the micro-batches of one pipeline step must have one size (the stages exchange fixed-size "
                        f"activations), found {sorted(sizes)} (input_ids rows{'' if llava else ', length'}); use "
                        "equal micro batches")  # fmt: skip
    vpp = len(chunks)
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if vpp > 1 and len(batches) % pp:
        raise NevaError(f"interleaved pipelining (virtual_pipeline_model_parallel_size {vpp}) needs the micro-batches "
                        f"per step ({len(batches)}) to be a multiple of pipeline_model_parallel_size ({pp}); change "
                        "global_batch_size or micro_batch_size")  # fmt: skip

    def forward_step(data_iterator: Any, model: Any) -> tuple[torch.Tensor, Callable[..., Any]]:
        output, mask = forward(model, next(data_iterator))
        return output, functools.partial(_reduce, mask)

    micro, seq = len(batches[0]["input_ids"]), sequence_length(chunks[0], batches[0])
    data = [iter(batches) for _ in chunks] if vpp > 1 else iter(batches)
    schedule = get_forward_backward_func()
    store = schedule(forward_step_func=forward_step, data_iterator=data, model=chunks if vpp > 1 else chunks[0],
                     num_microbatches=len(batches), seq_length=seq, micro_batch_size=micro,
                     forward_only=forward_only)  # fmt: skip
    return _broadcast_losses(store, len(batches), chunks)


def _reduce(mask: torch.Tensor | None, output: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """megatron-core's ``loss_func`` (last stage): the micro-batch's token-mean loss and what to log."""
    assert mask is not None, "the last pipeline stage must return the loss mask"
    loss, tokens = masked_mean(output, mask)
    # clones: the schedule divides the returned loss in place by the number of micro-batches
    return loss, {"loss": loss.detach().clone(), "tokens": tokens.detach().float()}


def _broadcast_losses(store: list[dict[str, torch.Tensor]], count: int, chunks: list[Any]) -> StepLosses:
    """The last stage's logged losses and tokens, sent to every stage of the pipeline."""
    from megatron.core import parallel_state

    device = next(chunks[0].parameters()).device
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        values = torch.stack([torch.stack([s["loss"].float(), s["tokens"].float()]) for s in store]).to(device)
    else:
        values = torch.zeros(count, 2, device=device)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(values, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                    group=parallel_state.get_pipeline_model_parallel_group())  # fmt: skip
    return StepLosses(losses=values[:, 0], tokens=values[:, 1])


def train_step(chunks: list[Any], optimizer: Any, batches: list[dict[str, Any]], forward: StageForward) -> tuple[
        StepLosses, Any]:  # fmt: skip
    """One optimizer step over ``batches``: zero the gradients, run the schedule (forward and backward passes,
    gradient reduction), step megatron-core's optimizer. Returns the losses and the optimizer's
    :class:`~neva_tools.train.megatron_optim.StepResult`."""
    from neva_tools.train import megatron_optim as mo

    configure(chunks, optimizer)
    mo.zero_grad(chunks, optimizer)
    losses = run_schedule(chunks, batches, forward)
    success, grad_norm, num_zeros = optimizer.step()
    result = mo.StepResult(success=bool(success), grad_norm=None if grad_norm is None else float(grad_norm),
                           num_zeros=None if num_zeros is None else int(num_zeros))  # fmt: skip
    return losses, result


def evaluate(chunks: list[Any], batches: list[dict[str, Any]], forward: StageForward) -> StepLosses:
    """The losses of ``batches`` without gradients (forward-only schedule), on every stage."""
    configure(chunks, None)
    was_training = [chunk.training for chunk in chunks]
    for chunk in chunks:
        chunk.eval()
    try:
        with torch.no_grad():
            return run_schedule(chunks, batches, forward, forward_only=True)
    finally:
        for chunk, mode in zip(chunks, was_training, strict=True):
            chunk.train(mode)
