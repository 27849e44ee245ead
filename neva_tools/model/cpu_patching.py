"""Helpers shared by the CPU patches of :mod:`neva_tools.model.cpu_compat` and :mod:`.cpu_compat_train`.

``mark``/``is_marked`` tag a replacement so a patch can tell it was already applied; :func:`tensor_cuda_is_noop`
makes ``tensor.cuda()`` a no-op within a block; :class:`CpuTensorsTorch` is ``torch`` as one megatron-core module
sees it once its global name ``torch`` is replaced: the tensor factories asked for ``device="cuda"`` allocate on the
CPU.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

MARK = "_neva_cpu_compat"  # set on every replacement so each patch can tell it was already applied


def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Tag ``fn`` as a CPU-compatibility replacement; return it."""
    setattr(fn, MARK, True)
    return fn


def is_marked(obj: object) -> bool:
    """Whether ``obj`` is a replacement tagged by :func:`mark`."""
    return getattr(obj, MARK, False)


@contextlib.contextmanager
def tensor_cuda_is_noop() -> Iterator[None]:
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


class CpuTensorsTorch(types.ModuleType):
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


def use_cpu_factories(module: types.ModuleType) -> None:
    """Replace ``module``'s global name ``torch`` by :class:`CpuTensorsTorch` (once)."""
    if not isinstance(module.torch, CpuTensorsTorch):
        module.torch = CpuTensorsTorch()
