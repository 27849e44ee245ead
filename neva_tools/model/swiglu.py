"""SwiGLU for megatron-core's unfused MLP path, as one autograd function.

Without ``bias_activation_fusion`` (always so on CPU, where the fusions are off), megatron-core's ``MLP``
computes ``silu(gate) * (up + glu_linear_offset)`` from ``torch.chunk`` views of ``linear_fc1``'s output. Autograd
then keeps that output, ``silu(gate)`` and the sum ``up + 0`` (four half-widths), and the backward of ``chunk``
concatenates the two half gradients into a new tensor. :class:`SwiGLU` keeps ``linear_fc1``'s output and
``silu(gate)`` (three half-widths) and writes both half gradients straight into one tensor. Same values, same
parameters and state-dict keys.

When ``linear_fc1`` is a plain linear (one TP rank, no bias; :mod:`neva_tools.model.linear`), :class:`LinearSwiGLU`
goes one step further and takes the linear in: it multiplies by the gate and the up halves of the weight separately,
so ``gate`` and ``up`` come out contiguous and every elementwise pass of SwiGLU, forward and backward, runs on
contiguous memory (on the halves of one ``[tokens, 2f]`` tensor they are strided and, on the CPU, measurably
slower); the two weight-gradient halves are written into one tensor. That path reads ``linear_fc1.weight`` without
calling ``linear_fc1``, so it is only taken while no forward hook or pre-hook is registered on ``linear_fc1`` (nor
globally): megatron-core's ``DistributedDataParallel`` with ``overlap_param_gather`` waits for a weight's all-gather in
a forward pre-hook of the module owning it, and a hooked ``linear_fc1`` is called like any other module.

:class:`SwiGluMLP` is megatron-core's ``MLP`` using it; every other configuration (fused bias-activation, clamped
or offset GLU, per-token scales, Transformer Engine activations) goes to megatron-core's own ``forward``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP
from torch.nn.modules import module as _nn_module


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


class LinearSwiGLU(torch.autograd.Function):
    """``silu(x @ W[:f].T) * (x @ W[f:].T)`` for ``W`` of shape ``[2f, h]``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        f = weight.shape[0] // 2
        gate, up = F.linear(x, weight[:f]), F.linear(x, weight[f:])
        activated = F.silu(gate)
        ctx.save_for_backward(x, weight, gate, up, activated)
        return activated * up

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, weight, gate, up, activated = ctx.saved_tensors
        f = weight.shape[0] // 2
        grad_up = (grad * activated).reshape(-1, f)
        grad_gate = grad * up
        torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
        grad_gate = grad_gate.reshape(-1, f)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(grad_gate, weight[:f]).addmm_(grad_up, weight[f:]).view(x.shape)
        if ctx.needs_input_grad[1]:
            flat = x.reshape(-1, x.shape[-1])
            grad_weight = torch.empty_like(weight)
            torch.mm(grad_gate.t(), flat, out=grad_weight[:f])
            torch.mm(grad_up.t(), flat, out=grad_weight[f:])
        return grad_x, grad_weight


def linear_swiglu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """SwiGLU of ``x @ weight.T`` (gate rows first) computed by :class:`LinearSwiGLU`."""
    return LinearSwiGLU.apply(x, weight)


def _has_forward_hooks(module: torch.nn.Module) -> bool:
    """Whether calling ``module`` would run any forward hook or pre-hook (its own or a global one)."""
    return bool(
        module._forward_pre_hooks or module._forward_hooks
        or _nn_module._global_forward_pre_hooks or _nn_module._global_forward_hooks
    )  # fmt: skip


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
        fc1 = self.linear_fc1
        if getattr(fc1, "_single_rank", False) and fc1.bias is None and not _has_forward_hooks(fc1):
            return self.linear_fc2(linear_swiglu(hidden_states, fc1.weight))
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
