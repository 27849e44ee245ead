"""CPU patches for megatron-core 0.16.1's training machinery: optimizers and pipeline-parallel schedules.

Part of :func:`neva_tools.model.cpu_compat.apply_cpu_compat` (which applies them, only without CUDA; the names are
importable from there too). Each patch's docstring names the megatron-core call site it fixes.

Pipeline parallelism (``pipeline_parallel/schedules.py`` and ``p2p_communication.py``) runs on CPU over gloo with
these and the device patches of ``cpu_compat``: the point-to-point exchange of activations and their gradients goes
through ``torch.distributed.batch_isend_irecv`` (megatron-core's default ``batch_p2p_comm``), which gloo runs as
separate ``isend``/``irecv`` operations; its buffers are allocated on ``torch.cuda.current_device()`` (``"cpu"``
here) and its ``torch.cuda.synchronize()`` is a no-op.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch

from neva_tools.model.cpu_patching import is_marked, mark, use_cpu_factories

__all__ = [
    "patch_grad_norm",
    "patch_optimizer_cuda_tensors",
    "patch_optimizer_cuda_type_checks",
    "patch_schedule_cuda_tensors",
    "patch_tied_embedding_setup",
]


# --------------------------------------------------------------------------------------------------------------
# Optimizers (optimizer/optimizer.py, optimizer/distrib_optimizer.py, optimizer/clip_grads.py, optimizer/grad_scaler.py)
# --------------------------------------------------------------------------------------------------------------


def patch_optimizer_cuda_tensors() -> None:
    """Let megatron-core's optimizer modules allocate their small bookkeeping tensors on the CPU.

    Fixes the ``device='cuda'`` tensors of ``MixedPrecisionOptimizer`` (``found_inf``, ``_scale_one``,
    ``_dummy_overflow_buf``) and ``FP32Optimizer`` (``_scale``) in ``optimizer/optimizer.py``, of
    ``get_grad_norm_fp32``, ``clip_grad_by_total_norm_fp32`` and ``count_zeros_fp32`` in ``optimizer/clip_grads.py``,
    and of ``ConstantGradScaler``/``DynamicGradScaler`` in ``optimizer/grad_scaler.py`` (fp16 loss scaling).
    Only those three modules see the changed ``torch`` (their global name ``torch`` is replaced); every other
    attribute is torch's own.
    """
    if torch.cuda.is_available():
        return
    from megatron.core.optimizer import clip_grads, grad_scaler
    from megatron.core.optimizer import optimizer as mcore_optimizer

    for module in (mcore_optimizer, clip_grads, grad_scaler):
        use_cpu_factories(module)


@contextlib.contextmanager
def _cuda_tensor_type_names() -> Iterator[None]:
    """Within the block, ``tensor.type()`` names CPU tensors as CUDA ones (``torch.cuda.BFloat16Tensor``)."""
    defined_here = "type" in torch.Tensor.__dict__
    original = torch.Tensor.type

    def type_(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:
        if dtype is None and not kwargs and self.device.type == "cpu":
            return original(self).replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        if defined_here:
            torch.Tensor.type = original
        else:
            del torch.Tensor.type


def _with_cuda_type_names(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with _cuda_tensor_type_names():
            return fn(*args, **kwargs)

    return mark(wrapped)


def patch_optimizer_cuda_type_checks() -> None:
    """Let megatron-core's optimizers accept CPU parameters and gradients.

    Fixes the ``param.type() in ['torch.cuda.HalfTensor', 'torch.cuda.BFloat16Tensor']`` /
    ``== 'torch.cuda.FloatTensor'`` checks in ``Float16OptimizerWithFloat16Params.__init__``
    (``optimizer/optimizer.py``: "Wrapped parameters must be one of torch.cuda.FloatTensor, ...") and
    ``DistributedOptimizer.__init__``
    (``optimizer/distrib_optimizer.py``, also ``_build_model_and_main_param_groups``), and the
    ``assert param.grad.type() == 'torch.cuda.FloatTensor'`` of ``clip_grad_by_total_norm_fp32``
    (``optimizer/clip_grads.py``, imported by name into ``optimizer/optimizer.py``): while those run, ``.type()`` of a
    CPU tensor reports the CUDA type name; ``torch.Tensor.type`` is restored afterwards.
    """
    if torch.cuda.is_available():
        return
    from megatron.core.optimizer import clip_grads, distrib_optimizer
    from megatron.core.optimizer import optimizer as mcore_optimizer

    for cls in (mcore_optimizer.Float16OptimizerWithFloat16Params, distrib_optimizer.DistributedOptimizer):
        if not is_marked(cls.__init__):
            cls.__init__ = _with_cuda_type_names(cls.__init__)
    if not is_marked(clip_grads.clip_grad_by_total_norm_fp32):
        clip_grads.clip_grad_by_total_norm_fp32 = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    mcore_optimizer.clip_grad_by_total_norm_fp32 = clip_grads.clip_grad_by_total_norm_fp32


@mark
def _cpu_multi_tensor_l2_norm(
    chunk_size: int, noop_flag: Any, tensor_lists: list[list[torch.Tensor]], per_tensor: bool, *args: Any
) -> tuple[torch.Tensor, None]:
    """Stand-in for ``amp_C.multi_tensor_l2norm``: the fp32 L2 norm of the tensors of ``tensor_lists[0]``, shape 1."""
    tensors = tensor_lists[0]
    if not tensors:
        return torch.zeros(1), None
    norms = torch.stack([torch.linalg.vector_norm(t, dtype=torch.float32) for t in tensors])
    return torch.linalg.vector_norm(norms).reshape(1), None


def patch_grad_norm() -> None:
    """Compute the gradient L2 norm on the CPU.

    Fixes ``get_grad_norm_fp32`` (``optimizer/clip_grads.py``, used by every optimizer's ``step()`` to clip and report
    the norm): without Apex and TE it calls ``utils.local_multi_tensor_l2_norm``, which returns its result on
    ``device="cuda"``. Replaced only when that local fallback is the one in use.
    """
    if torch.cuda.is_available():
        return
    from megatron.core import utils as mcore_utils
    from megatron.core.optimizer import clip_grads

    if clip_grads.l2_norm_impl is mcore_utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = _cpu_multi_tensor_l2_norm


# --------------------------------------------------------------------------------------------------------------
# Pipeline parallelism (pipeline_parallel/schedules.py, models/common/language_module/language_module.py)
# --------------------------------------------------------------------------------------------------------------


def patch_schedule_cuda_tensors() -> None:
    """Let the pipeline schedules count tokens on the CPU.

    Fixes ``total_num_tokens = torch.zeros([], dtype=torch.int, device="cuda")`` in ``forward_backward_no_pipelining``,
    ``forward_backward_pipelining_with_interleaving`` and ``forward_backward_pipelining_without_interleaving``
    (``pipeline_parallel/schedules.py``): only that module's global name ``torch`` is replaced (see
    :class:`~neva_tools.model.cpu_patching.CpuTensorsTorch`).
    """
    if torch.cuda.is_available():
        return
    from megatron.core.pipeline_parallel import schedules

    use_cpu_factories(schedules)


def patch_tied_embedding_setup() -> None:
    """Let a pipeline's last stage copy the tied word embeddings from the first stage without CUDA.

    Fixes ``LanguageModule.setup_embeddings_and_output_layer``
    (``models/common/language_module/language_module.py``): with ``share_embeddings_and_output_weights`` and
    pipeline stages, the last stage's output-layer copy is all-reduced with the first stage's embedding after
    ``weight.data = weight.data.cuda()``, which fails without CUDA; ``.cuda()`` is a no-op while it runs.
    """
    if torch.cuda.is_available():
        return
    from megatron.core.models.common.language_module.language_module import LanguageModule

    from neva_tools.model.cpu_patching import tensor_cuda_is_noop

    original = LanguageModule.setup_embeddings_and_output_layer
    if is_marked(original):
        return

    @functools.wraps(original)
    def setup(self: Any) -> None:
        with tensor_cuda_is_noop():
            original(self)

    LanguageModule.setup_embeddings_and_output_layer = mark(setup)
