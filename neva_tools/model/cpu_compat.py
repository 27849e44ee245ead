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

Pipeline parallelism (megatron-core's ``get_forward_backward_func`` schedules, 1F1B and interleaved) runs on CPU
over gloo too: point-to-point exchange through ``torch.distributed.batch_isend_irecv``, the schedules' token
counter and the tied embedding's first-to-last-stage copy are patched in :mod:`neva_tools.model.cpu_compat_train`.

The patches live in three modules: this one (devices, RNG, attention masks, the vision encoder),
:mod:`neva_tools.model.cpu_compat_train` (optimizers, pipeline schedules) and their shared helpers in
:mod:`neva_tools.model.cpu_patching`; every ``patch_*`` name is importable from here.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from typing import Any

import torch

from neva_tools.model.cpu_compat_train import (
    patch_grad_norm,
    patch_optimizer_cuda_tensors,
    patch_optimizer_cuda_type_checks,
    patch_schedule_cuda_tensors,
    patch_tied_embedding_setup,
)
from neva_tools.model.cpu_patching import is_marked, mark, tensor_cuda_is_noop

logger = logging.getLogger(__name__)

SUPPORTED_MEGATRON_CORE_VERSION = "0.16.1"
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
    patch_schedule_cuda_tensors()
    patch_tied_embedding_setup()
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


_mark, _is_marked, _tensor_cuda_is_noop = mark, is_marked, tensor_cuda_is_noop  # the names used below


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
