"""Make megatron-core 0.16.1 run on CPU (gloo backend, no CUDA).

megatron-core assumes a GPU in a handful of call sites. ``apply_cpu_compat()`` patches exactly those, and only
when ``torch.cuda.is_available()`` is False; on a GPU machine it does nothing. Each patch is a small function below
whose docstring names the megatron-core call site it fixes. The patches were checked against megatron-core 0.16.1;
another version logs a warning (the call sites may have moved), and ``tests/model/test_cpu_compat.py`` has one test
per patch.

megatron-core's ``DistributedDataParallel`` (contiguous grad buffers, ``overlap_grad_reduce``,
``overlap_param_gather``) and ``get_megatron_optimizer`` (``Float16OptimizerWithFloat16Params``, ``FP32Optimizer``,
``DistributedOptimizer``, grad clipping, dynamic loss scaling) run on CPU over gloo with these patches: gloo in
torch >= 2.14 has the ``reduce_scatter_tensor``/``all_gather_into_tensor`` they use. Not covered here (use something
else on CPU): ``sequence_parallel=True`` (needs Apex or TE), ``num_distributed_optimizer_instances > 1`` (CUDA
streams), ``nccl_ub``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

logger = logging.getLogger(__name__)

SUPPORTED_MEGATRON_CORE_VERSION = "0.16.1"
_MARK = "_neva_cpu_compat"  # set on every replacement so each patch can tell it was already applied
_APPLIED = False


def apply_cpu_compat() -> None:
    """Apply all CPU patches to megatron-core; a no-op when CUDA is available or when already applied."""
    global _APPLIED
    if torch.cuda.is_available() or _APPLIED:
        return
    check_megatron_version()
    patch_rng_tracker()
    patch_cuda_current_device()
    patch_causal_masks()
    patch_cuda_synchronize()
    patch_recompute_rng()
    patch_clip_vit_model()
    patch_optimizer_cuda_tensors()
    patch_optimizer_cuda_type_checks()
    patch_grad_norm()
    _APPLIED = True
    logger.debug("applied megatron-core CPU compatibility patches")


def check_megatron_version() -> bool:
    """Warn (and return False) when the installed megatron-core is not the version these patches were checked on."""
    import megatron.core

    version = getattr(megatron.core, "__version__", "unknown")
    if version != SUPPORTED_MEGATRON_CORE_VERSION:
        logger.warning(
            "megatron-core %s is installed but the CPU patches in %s were checked against %s; "
            "run `pytest tests/model/test_cpu_compat.py` to see which still apply",
            version,
            __name__,
            SUPPORTED_MEGATRON_CORE_VERSION,
        )
        return False
    return True


def _mark(fn: Callable[..., Any]) -> Callable[..., Any]:
    setattr(fn, _MARK, True)
    return fn


def _is_marked(obj: object) -> bool:
    return getattr(obj, _MARK, False)


# --------------------------------------------------------------------------------------------------------------
# RNG states tracker
# --------------------------------------------------------------------------------------------------------------


_CPU_TRACKER_CLASS: type | None = None


def _cpu_tracker_class() -> type:
    """Build (once) a ``CudaRNGStatesTracker`` subclass whose named states are states of torch's CPU generator."""
    global _CPU_TRACKER_CLASS
    if _CPU_TRACKER_CLASS is not None:
        return _CPU_TRACKER_CLASS
    from megatron.core.tensor_parallel.random import _MODEL_PARALLEL_RNG_TRACKER_NAME, CudaRNGStatesTracker

    class CpuRNGStatesTracker(CudaRNGStatesTracker):
        """Named CPU RNG streams (``model-parallel-rng``, ``data-parallel-rng``, ``expert-parallel-rng``).

        ``fork(name)`` swaps torch's default CPU generator to the named state and back, like megatron's CUDA tracker
        does with the CUDA generator; nested forks keep each stream's progress the way megatron's tracker does.
        """

        def add(self, name: str, seed: int) -> None:
            """Start tracking a CPU RNG stream seeded with ``seed`` under ``name``."""
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"cpu rng state {name} already exists")
            outer = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)

        @contextlib.contextmanager
        def fork(self, name: str = _MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
            """Run the body with torch's CPU generator set to the ``name`` stream, then restore the outer state."""
            if name not in self.states_:
                raise Exception(f"cuda rng state {name} is not added")
            outer_state = torch.get_rng_state()
            outer_name = self._current_state_name
            if outer_name != "default-rng":
                self.states_[outer_name] = outer_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if outer_name != "default-rng":
                    outer_state = self.states_[outer_name]
                torch.set_rng_state(outer_state)
                self._current_state_name = outer_name

    _CPU_TRACKER_CLASS = CpuRNGStatesTracker
    return CpuRNGStatesTracker


def patch_rng_tracker() -> None:
    """Install a CPU RNG-states tracker as megatron's global tracker.

    Fixes ``tensor_parallel.random.get_cuda_rng_tracker().fork()`` (attention dropout in
    ``transformer/dot_product_attention.py``, embedding dropout, GPU weight init in ``tensor_parallel/layers.py``):
    the CUDA tracker calls ``torch.cuda.get_rng_state``, and without ``model_parallel_cuda_manual_seed`` (which
    needs CUDA) dropout fails with ``cuda rng state model-parallel-rng is not added``. With this tracker installed,
    megatron's own ``model_parallel_cuda_manual_seed`` also works on CPU. Seed it with :func:`model_parallel_seed`.
    """
    if torch.cuda.is_available():
        return
    from megatron.core.tensor_parallel import random as mcore_random

    tracker_class = _cpu_tracker_class()
    if isinstance(mcore_random._CUDA_RNG_STATE_TRACKER, tracker_class):
        return
    mcore_random._CUDA_RNG_STATE_TRACKER = tracker_class()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def model_parallel_seed(seed: int, tp_rank: int | None = None) -> None:
    """Seed torch and megatron's RNG tracker the way ``tensor_parallel.model_parallel_cuda_manual_seed`` does.

    The default generator gets ``seed`` (the same on all tensor-parallel ranks, used for dropout outside
    tensor-parallel regions); ``model-parallel-rng`` gets ``seed + 2718 + tp_rank`` (different per TP rank);
    ``data-parallel-rng`` gets ``seed``; ``expert-parallel-rng`` gets ``seed + 1024 + 100 * ep_rank + etp_rank``.
    Ranks come from megatron's parallel state when it is initialized, else 0. On a GPU this calls megatron's
    ``model_parallel_cuda_manual_seed``; on CPU it installs and seeds the CPU tracker.
    """
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.tensor_parallel import random as mcore_random

    initialized = parallel_state.model_parallel_is_initialized()
    if tp_rank is None:
        tp_rank = parallel_state.get_tensor_model_parallel_rank() if initialized else 0
    ep_rank = parallel_state.get_expert_model_parallel_rank() if initialized else 0
    etp_rank = parallel_state.get_expert_tensor_parallel_rank() if initialized else 0
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed, tp_rank=tp_rank, ep_rank=ep_rank, etp_rank=etp_rank)
        return
    patch_rng_tracker()
    tracker = mcore_random._CUDA_RNG_STATE_TRACKER
    tracker.reset()
    tracker.add(mcore_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mcore_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)


# --------------------------------------------------------------------------------------------------------------
# torch.cuda functions megatron-core calls unconditionally
# --------------------------------------------------------------------------------------------------------------


@_mark
def _cpu_current_device() -> str:
    """Stand-in for ``torch.cuda.current_device()`` without CUDA: the device to allocate on."""
    return "cpu"


@_mark
def _noop_synchronize(device: Any = None) -> None:
    """Stand-in for ``torch.cuda.synchronize()`` without CUDA: CPU ops are already synchronous."""


def patch_cuda_current_device() -> None:
    """Make ``torch.cuda.current_device()`` return ``"cpu"`` when CUDA is absent.

    Fixes ``RotaryEmbedding.get_emb`` (``models/common/embeddings/rotary_pos_embedding.py``: moves ``inv_freq`` to
    ``torch.cuda.current_device()``), ``GlobalMemoryBuffer.get_tensor`` (``utils.py``), the TP>1 collectives in
    ``tensor_parallel/mappings.py`` and the grad (and, with the distributed optimizer, param) buffers of
    ``DistributedDataParallel`` (``distributed/param_and_grad_buffer.py``), which allocate on that device.
    """
    if torch.cuda.is_available() or _is_marked(torch.cuda.current_device):
        return
    torch.cuda.current_device = _cpu_current_device


def patch_cuda_synchronize() -> None:
    """Make ``torch.cuda.synchronize()`` a no-op when CUDA is absent.

    Fixes ``dist_checkpointing`` (``strategies/fully_parallel.py``, ``strategies/filesystem_async.py``,
    ``strategies/async_utils.py``, ``tensor_aware_state_dict.py``), which synchronizes before and after writing.
    """
    if torch.cuda.is_available() or _is_marked(torch.cuda.synchronize):
        return
    torch.cuda.synchronize = _noop_synchronize


@_mark
def _cpu_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    """Stand-in for megatron's ``_get_cuda_rng_state`` without CUDA: the CPU generator's state."""
    return torch.get_rng_state()


@_mark
def _set_cpu_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    """Stand-in for megatron's ``_set_cuda_rng_state`` without CUDA."""
    torch.set_rng_state(new_state)


def patch_recompute_rng() -> None:
    """Make megatron's "CUDA" RNG state the CPU generator's when CUDA is absent.

    Fixes activation recompute: ``tensor_parallel.random.CheckpointFunction`` (full recompute, and the core
    attention of selective recompute) saves every RNG state before the forward pass and restores it before
    recomputing, through ``_get_all_rng_states``/``_set_all_rng_states``, which call ``_get_cuda_rng_state`` and
    ``_set_cuda_rng_state`` (``torch.cuda.get_rng_state``). On CPU, dropout draws from the CPU generator (the CPU
    tracker of :func:`patch_rng_tracker` forks that one too), so that is the state to save and restore.
    """
    from megatron.core.tensor_parallel import random as mcore_random

    if torch.cuda.is_available() or _is_marked(mcore_random._get_cuda_rng_state):
        return
    mcore_random._get_cuda_rng_state = _cpu_rng_state
    mcore_random._set_cuda_rng_state = _set_cpu_rng_state


# --------------------------------------------------------------------------------------------------------------
# Attention masks
# --------------------------------------------------------------------------------------------------------------


@_mark
def _cpu_default_causal_mask(sq: int) -> torch.Tensor:
    """Causal mask ``[sq, sq]`` (True above the diagonal = masked), on the CPU."""
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


@_mark
def _cpu_sliding_window_causal_mask(sq: int, skv: int, window_size: tuple[int, int]) -> torch.Tensor:
    """Sliding-window causal mask ``[sq, skv]`` (True = masked), on the CPU; same maths as megatron-core's."""
    m = torch.ones(sq, skv, dtype=torch.bool)
    mu = torch.triu(m, diagonal=skv - sq - window_size[0])
    return ~torch.tril(mu, diagonal=skv - sq + window_size[1])


def patch_causal_masks() -> None:
    """Build default causal (and sliding-window) masks on the CPU.

    Fixes ``transformer/utils.get_default_causal_mask`` and ``get_sliding_window_causal_mask``, which hard-code
    ``device="cuda"``; ``FusedScaleMaskSoftmax.forward_torch_softmax`` (``fusions/fused_softmax.py``, which imports
    both by name) calls them when ``attention_mask=None``, as ``LLaVAModel`` passes. Patched in both modules.
    """
    if torch.cuda.is_available():
        return
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as transformer_utils

    for module in (transformer_utils, fused_softmax):
        module.get_default_causal_mask = _cpu_default_causal_mask
        module.get_sliding_window_causal_mask = _cpu_sliding_window_causal_mask


# --------------------------------------------------------------------------------------------------------------
# CLIPViTModel (used by LLaVAModel)
# --------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _tensor_cuda_is_noop() -> Iterator[None]:
    """Within the block, ``tensor.cuda()`` returns the tensor unchanged."""
    defined_here = "cuda" in torch.Tensor.__dict__
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        if defined_here:
            torch.Tensor.cuda = original
        else:
            del torch.Tensor.cuda


def patch_clip_vit_model() -> None:
    """Let ``CLIPViTModel`` be built without Transformer Engine and without CUDA.

    Fixes ``models/vision/clip_vit_model.py``: without TE the default ``ln_pre_impl``/``ln_post_impl`` is
    ``torch.nn.LayerNorm``, which ``build_module`` calls with ``config=`` (TypeError) and which ``LLaVAModel`` gives no
    way to override, so the default becomes ``transformer.torch_norm.WrappedTorchNorm``; and ``__init__`` calls
    ``.cuda()`` on its ``position_ids``, which becomes a no-op while the model is constructed.
    """
    if torch.cuda.is_available():
        return
    from megatron.core.models.vision import clip_vit_model
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    cls = clip_vit_model.CLIPViTModel
    if _is_marked(cls.__init__):
        return
    original_init = cls.__init__
    if original_init.__defaults__:
        original_init.__defaults__ = tuple(
            WrappedTorchNorm if default is torch.nn.LayerNorm else default for default in original_init.__defaults__
        )

    @functools.wraps(original_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        with _tensor_cuda_is_noop():
            original_init(self, *args, **kwargs)

    cls.__init__ = _mark(__init__)


# --------------------------------------------------------------------------------------------------------------
# Optimizers (optimizer/optimizer.py, optimizer/distrib_optimizer.py, optimizer/clip_grads.py, optimizer/grad_scaler.py)
# --------------------------------------------------------------------------------------------------------------


def _is_cuda(device: Any) -> bool:
    if isinstance(device, int):  # a CUDA device index, as torch.cuda.current_device() returns with a GPU
        return True
    return device is not None and torch.device(device).type == "cuda"


def _cpu_factory(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(factory)
    def make(*args: Any, **kwargs: Any) -> torch.Tensor:
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return make


class _CpuTensorsTorch(types.ModuleType):
    """``torch`` as one megatron-core module sees it: the real module, except that the tensor factories
    (``tensor``, ``zeros``, ``ones``, ``empty``, ``full``) asked for ``device="cuda"`` allocate on the CPU."""

    tensor = staticmethod(_cpu_factory(torch.tensor))
    zeros = staticmethod(_cpu_factory(torch.zeros))
    ones = staticmethod(_cpu_factory(torch.ones))
    empty = staticmethod(_cpu_factory(torch.empty))
    full = staticmethod(_cpu_factory(torch.full))

    def __init__(self) -> None:
        super().__init__("torch", "torch with CPU tensor factories (neva_tools.model.cpu_compat)")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


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
        if not isinstance(module.torch, _CpuTensorsTorch):
            module.torch = _CpuTensorsTorch()


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

    return _mark(wrapped)


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
        if not _is_marked(cls.__init__):
            cls.__init__ = _with_cuda_type_names(cls.__init__)
    if not _is_marked(clip_grads.clip_grad_by_total_norm_fp32):
        clip_grads.clip_grad_by_total_norm_fp32 = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    mcore_optimizer.clip_grad_by_total_norm_fp32 = clip_grads.clip_grad_by_total_norm_fp32


@_mark
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
