"""SwiGLU for megatron-core's unfused MLP path, as one autograd function.

Without ``bias_activation_fusion`` (always so on CPU, where the fusions are off), megatron-core's ``MLP``
computes ``silu(gate) * (up + glu_linear_offset)`` from ``torch.chunk`` views of ``linear_fc1``'s output. Autograd
then keeps that output, ``silu(gate)`` and the sum ``up + 0`` (four half-widths), and the backward of ``chunk``
concatenates the two half gradients into a new tensor. :class:`SwiGLU` keeps ``linear_fc1``'s output and
``silu(gate)`` (three half-widths) and writes both half gradients straight into one tensor. Same values, same
parameters and state-dict keys.

:class:`SwiGluMLP` is megatron-core's ``MLP`` using it; every other configuration (fused bias-activation, clamped
or offset GLU, per-token scales, Transformer Engine activations) goes to megatron-core's own ``forward``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP


class SwiGLU(torch.autograd.Function):
    """``silu(y[..., :f]) * y[..., f:]`` for ``y`` of last dimension ``2f``."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor) -> torch.Tensor:
        gate, up = torch.chunk(y, 2, dim=-1)
        activated = F.silu(gate)
        ctx.save_for_backward(y, activated)
        return activated * up

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        y, activated = ctx.saved_tensors
        gate, up = torch.chunk(y, 2, dim=-1)
        grad_y = torch.empty_like(y)
        grad_gate, grad_up = torch.chunk(grad_y, 2, dim=-1)
        torch.mul(activated, grad, out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
        return grad_y


def swiglu(y: torch.Tensor) -> torch.Tensor:
    """SwiGLU of ``linear_fc1``'s output (gate half first, as megatron-core lays it out on every TP rank)."""
    return SwiGLU.apply(y)


class SwiGluMLP(MLP):
    """megatron-core ``MLP`` whose unfused SwiGLU is :func:`swiglu`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        c = self.config
        self._plain_swiglu = (
            c.gated_linear_unit and self.activation_func is F.silu and not c.bias_activation_fusion
            and not c.use_te_activation_func and c.activation_func_clamp_value is None and not c.glu_linear_offset
        )  # fmt: skip

    def forward(self, hidden_states: torch.Tensor, per_token_scale: torch.Tensor | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        if not self._plain_swiglu or per_token_scale is not None:
            return super().forward(hidden_states, per_token_scale, **kwargs)
        intermediate, bias = self.linear_fc1(hidden_states)
        if bias is not None:
            intermediate = intermediate + bias
        return self.linear_fc2(swiglu(intermediate))


def use_swiglu_mlp(spec: Any) -> Any:
    """Return ``spec`` (a transformer-layer ``ModuleSpec``) with its dense MLP module set to :class:`SwiGluMLP`."""
    mlp = spec.submodules.mlp
    if getattr(mlp, "module", None) is not MLP:
        raise TypeError(f"expected a dense megatron-core MLP in the layer spec, found {getattr(mlp, 'module', mlp)}")
    mlp.module = SwiGluMLP
    return spec
