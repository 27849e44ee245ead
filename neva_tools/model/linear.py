"""megatron-core's tensor-parallel linears, computed by ``torch.nn.functional.linear`` when TP is 1.

``ColumnParallelLinear`` and ``RowParallelLinear`` route every call through Python autograd functions: one that
would all-reduce or gather across the TP group, and ``LinearWithGradAccumulationAndAsyncCommunication``, whose
backward runs in Python. With one TP rank there is nothing to communicate, and those functions only add Python
time to every linear of every layer (about 1% of a small model's training step on CPU). The subclasses here keep
megatron-core's parameters, initialization and state-dict keys and compute the same ``x @ W.T (+ b)`` in one
native call when the TP group has one rank and no feature that needs megatron-core's path is on (sequence
parallelism, expert communication, gradient-accumulation fusion, deferred embedding wgrad, CPU offloading, a
weight passed at call time).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.utils import get_pg_size


def _single_rank(layer: ColumnParallelLinear | RowParallelLinear) -> bool:
    c = layer.config
    return (
        get_pg_size(layer.tp_group) == 1 and not layer.sequence_parallel and not layer.explicit_expert_comm
        and not layer.gradient_accumulation_fusion and not c.defer_embedding_wgrad_compute and not c.cpu_offloading
    )  # fmt: skip


def _linear(layer: Any, input_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """megatron-core's output: ``x @ W.T``, plus the bias unless it is returned separately (``skip_bias_add``)."""
    output = F.linear(input_, layer.weight)
    if layer.skip_bias_add:
        return output, layer.bias
    return (output + layer.bias if layer.bias is not None else output), None


class Tp1ColumnParallelLinear(ColumnParallelLinear):
    """``ColumnParallelLinear`` that is a plain linear on one TP rank."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._single_rank = _single_rank(self)

    def forward(self, input_: torch.Tensor, weight: torch.Tensor | None = None,
                runtime_gather_output: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        if not self._single_rank or weight is not None:
            return super().forward(input_, weight, runtime_gather_output)
        return _linear(self, input_)


class Tp1RowParallelLinear(RowParallelLinear):
    """``RowParallelLinear`` that is a plain linear on one TP rank."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._single_rank = _single_rank(self)

    def forward(self, input_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self._single_rank:
            return super().forward(input_)
        return _linear(self, input_)


def use_tp1_linears(spec: Any) -> Any:
    """Return ``spec`` (a transformer-layer ``ModuleSpec`` of the local kind) with its attention and MLP linears
    swapped for the subclasses above."""
    attention = spec.submodules.self_attention.submodules
    mlp = spec.submodules.mlp.submodules
    swaps = {ColumnParallelLinear: Tp1ColumnParallelLinear, RowParallelLinear: Tp1RowParallelLinear}
    for holder, name in ((attention, "linear_qkv"), (attention, "linear_proj"), (mlp, "linear_fc1"),
                         (mlp, "linear_fc2")):  # fmt: skip
        current = getattr(holder, name)
        if current not in swaps:
            raise TypeError(f"expected megatron-core's local {name} (Column/RowParallelLinear), found {current}")
        setattr(holder, name, swaps[current])
    return spec
