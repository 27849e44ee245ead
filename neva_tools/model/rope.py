"""Plain RoPE applied inside the SDPA core attention, without megatron-core's slicing copies.

megatron-core's unfused ``_apply_rotary_pos_emb_bshd`` splits query and key into a rotated part and a pass-through
part, rotates, and concatenates the two again, even when the pass-through part is empty (``rotary_percent`` 1.0,
as in every LLaMA-style model). The forward then copies query and key once more, and the backward builds two
zero-filled full-size gradients for the slices and adds them. :class:`RopeSelfAttention` hands the rotary
frequencies to :class:`~neva_tools.model.attention.SdpaDotProductAttention`, which applies :func:`rope_to_heads`
(the same arithmetic, ``t * cos + rotate_half(t) * sin``) while it moves query and key into SDPA's
``[b, heads, s, d]`` layout, one pass each way instead of megatron-core's five elementwise operations and a copy.

Only the plain case goes this way: training (no inference context), no packed THD sequences, no context parallelism,
non-interleaved rotary over the whole head, no YaRN scale, no fused RoPE and no activation recompute. Everything else
is megatron-core's own path.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.transformer.attention import SelfAttention

_TRIG: dict[str, Any] = {}  # the last frequencies seen and their cosine and sine


def _cos_sin(freqs: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` of ``freqs`` (``[s, 1, 1, d]``) as ``[1, 1, s, d]`` in ``dtype``. Every layer gets the same
    frequency tensor in a forward pass (megatron-core's ``RotaryEmbedding`` also caches it across steps), so the
    last result is kept and reused while the tensor is the same and unmodified (and the inference mode the same:
    tensors made under ``torch.inference_mode`` cannot be saved for a backward pass)."""
    key = (freqs._version, dtype, freqs.device, freqs.shape, torch.is_inference_mode_enabled())
    if _TRIG.get("freqs") is not freqs or _TRIG.get("key") != key:
        trig = tuple(f(freqs).to(dtype).permute(1, 2, 0, 3) for f in (torch.cos, torch.sin))
        _TRIG.update(freqs=freqs, key=key, trig=trig)
    return _TRIG["trig"]


class _RopeToHeads(torch.autograd.Function):
    """RoPE of ``t`` ``[s, b, heads, d]`` written straight into a new contiguous ``[b, heads, s, d]`` tensor."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        s, b, heads, d = t.shape
        half = d // 2
        cos, sin = _cos_sin(freqs, t.dtype)  # [1, 1, s, d]
        source = t.permute(1, 2, 0, 3)
        out = torch.empty(b, heads, s, d, dtype=t.dtype, device=t.device)
        torch.mul(source, cos, out=out)  # then the rotated halves: (-second, first) * sin
        out[..., :half].addcmul_(source[..., half:], sin[..., :half], value=-1)
        out[..., half:].addcmul_(source[..., :half], sin[..., half:])
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        cos, sin = ctx.saved_tensors
        half = grad.shape[-1] // 2
        grad_t = torch.mul(grad, cos, out=torch.empty(grad.shape, dtype=grad.dtype, device=grad.device))
        grad_t[..., :half].addcmul_(grad[..., half:], sin[..., half:])
        grad_t[..., half:].addcmul_(grad[..., :half], sin[..., :half], value=-1)
        return grad_t.permute(2, 0, 1, 3), None  # back to [s, b, heads, d]


def rope_to_heads(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """RoPE of ``t`` (``[s, b, heads, d]``, any strides) with ``freqs`` (``[s, 1, 1, d]``), as megatron-core's
    ``t * cos + rotate_half(t) * sin``, returned as a contiguous ``[b, heads, s, d]`` tensor (SDPA's layout):
    the rotation and the layout change are one pass forward and one backward."""
    return _RopeToHeads.apply(t, freqs)


class RopeSelfAttention(SelfAttention):
    """megatron-core ``SelfAttention`` whose plain RoPE is applied by its SDPA core attention."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
            _yarn_get_concentration_factor_from_config as yarn_scale,
        )

        from neva_tools.model.attention import SdpaDotProductAttention

        super().__init__(*args, **kwargs)
        c = self.config
        cp = getattr(getattr(self, "pg_collection", None), "cp", None)
        self._plain_rope = (
            isinstance(self.core_attention, SdpaDotProductAttention)
            and not c.rotary_interleaved and not c.multi_latent_attention and not c.apply_rope_fusion
            and not c.fused_single_qkv_rope and c.recompute_granularity is None and yarn_scale(c) == 1.0
            and (cp is None or cp.size() == 1)
        )  # fmt: skip

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                key_value_states: torch.Tensor | None = None, inference_context: Any = None,
                rotary_pos_emb: Any = None, *args: Any, **kwargs: Any) -> Any:  # fmt: skip
        """megatron-core's forward; plain RoPE is applied by the core attention instead of in between."""
        freqs = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb, rotary_pos_emb)
        if (
            not self._plain_rope or rotary_pos_emb is None or inference_context is not None or args
            or kwargs.get("inference_params") is not None or kwargs.get("packed_seq_params") is not None
            or any(f is None or f.shape[-1] != self.hidden_size_per_attention_head for f in freqs)
        ):  # fmt: skip
            return super().forward(hidden_states, attention_mask, key_value_states, inference_context,
                                   rotary_pos_emb, *args, **kwargs)  # fmt: skip
        self.core_attention.rotary = freqs
        try:
            return super().forward(hidden_states, attention_mask, key_value_states, None, None, **kwargs)
        finally:
            self.core_attention.rotary = None


def use_rope_self_attention(spec: Any) -> Any:
    """Return ``spec`` (a transformer-layer ``ModuleSpec``) with its self-attention :class:`RopeSelfAttention`."""
    attention = spec.submodules.self_attention
    if getattr(attention, "module", None) is not SelfAttention:
        raise TypeError(
            f"expected megatron-core SelfAttention in the layer spec, found {getattr(attention, 'module', attention)}"
        )
    attention.module = RopeSelfAttention
    return spec
