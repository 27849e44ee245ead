"""RMSNorm with one norm reduction forward and a written-out backward for CPU training.

megatron-core's local spec builds ``torch.nn.RMSNorm`` (``WrappedTorchNorm``). On the CPU, autograd decomposes it
into ``pow``, ``mean``, ``add``, ``rsqrt`` and two ``mul`` and records a backward node for each (torch's
``_fused_rms_norm`` has no CPU backward). :class:`RMSNorm` keeps ``torch.nn.RMSNorm``'s parameter, initialization
and state-dict key and, for float32 CPU inputs that need gradients, computes ``rstd`` with one norm reduction,
keeps ``x̂ = x·rstd`` for the backward (instead of ``x``) and computes the backward directly:

``dx = rstd·(g·w − x̂·mean(g·w·x̂))``, ``dw = Σ g·x̂``.

Every other case (CUDA, where torch has fused kernels both ways; half precision; no weight; no gradient) is
``torch.nn.RMSNorm``'s own forward. :class:`TorchNorm` is the spec entry that builds it where megatron-core's
``WrappedTorchNorm`` would build ``torch.nn.RMSNorm``.
"""

from __future__ import annotations

from typing import Any

import torch


class _RmsNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        width = x.shape[-1]
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(width).add_(eps).rsqrt_()
        x_hat = x * rstd
        ctx.save_for_backward(x_hat, weight, rstd)  # x̂ instead of x: the same memory, no recomputation
        return x_hat * weight

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x_hat, weight, rstd = ctx.saved_tensors
        width = x_hat.shape[-1]
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            scaled = grad * weight
            mean = torch.linalg.vecdot(scaled, x_hat).unsqueeze(-1).div_(width)
            grad_x = torch.addcmul(scaled, x_hat, mean, value=-1).mul_(rstd)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * x_hat).reshape(-1, width).sum(0)
        return grad_x, grad_weight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight · x / sqrt(mean(x², -1) + eps)`` with the forward and the direct backward above."""
    return _RmsNormFunction.apply(x, weight, eps)


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` over the last dimension, trained on the CPU by :func:`rms_norm`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if (
            weight is None or len(self.normalized_shape) != 1 or x.device.type != "cpu"
            or x.dtype != torch.float32 or weight.dtype != torch.float32
            or not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        ):  # fmt: skip
            return super().forward(x)
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return rms_norm(x, weight, eps)


class TorchNorm:
    """Spec entry with megatron-core ``WrappedTorchNorm``'s signature: :class:`RMSNorm` for ``RMSNorm`` configs,
    whatever ``WrappedTorchNorm`` builds otherwise."""

    def __new__(cls, config: Any, hidden_size: int, eps: float = 1e-5, **kwargs: Any) -> torch.nn.Module:
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        module = WrappedTorchNorm(config, hidden_size, eps, **kwargs)  # its checks, and the non-RMS norms
        if type(module) is not torch.nn.RMSNorm:
            return module
        return RMSNorm(normalized_shape=hidden_size, eps=eps)


def use_torch_norm(spec: Any) -> Any:
    """Return ``spec`` (a transformer-layer ``ModuleSpec``) with megatron-core's ``WrappedTorchNorm`` entries set to
    :class:`TorchNorm`; other norms (Apex's ``FusedLayerNorm`` where Apex is installed, identities) stay."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    for name in ("input_layernorm", "pre_mlp_layernorm"):
        if getattr(spec.submodules, name) is WrappedTorchNorm:
            setattr(spec.submodules, name, TorchNorm)
    return spec
