"""Plain RoPE applied on the way into SDPA's layout, without megatron-core's split and slicing copies.

megatron-core splits its fused QKV projection into query, key and value views and reshapes the query (a copy).
Its unfused ``_apply_rotary_pos_emb_bshd`` then splits query and key into a rotated part and a pass-through part,
rotates, and concatenates the two again, even when the pass-through part is empty (``rotary_percent`` 1.0, as in
every LLaMA-style model); the SDPA core attention copies all three into ``[b, heads, s, d]``; and the backward
builds zero-filled gradients for the slices and concatenates the query, key and value gradients.

:class:`RopeSelfAttention` does the plain case in one autograd function, :func:`qkv_to_heads`: one pass from the
projection output to query and key with RoPE (the same arithmetic, ``t * cos + rotate_half(t) * sin``) and value,
each contiguous ``[b, heads, s, d]``, and one pass back into a single gradient tensor. Where megatron-core's split
has more to do (QK norms, gated attention output, fewer query groups than TP ranks) it keeps that split and hands
the frequencies to :class:`~neva_tools.model.attention.SdpaDotProductAttention`, which applies
:func:`rope_to_heads` while it moves query and key into its layout.

Only the plain case goes either way: training (no inference context), no packed THD sequences, no context
parallelism, non-interleaved rotary over the whole head, no YaRN scale, no fused RoPE and no activation recompute.
Everything else is megatron-core's own path.
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


def _rotate_into(out: torch.Tensor, source: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """``out = source * cos + rotate_half(source) * sin`` (``rotate_half(t) = (-second half, first half)``)."""
    half = source.shape[-1] // 2
    torch.mul(source, cos, out=out)
    out[..., :half].addcmul_(source[..., half:], sin[..., :half], value=-1)
    out[..., half:].addcmul_(source[..., :half], sin[..., half:])


def _unrotate_into(out: torch.Tensor, grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """The gradient of :func:`_rotate_into` with respect to ``source``, for ``grad`` of its output."""
    half = grad.shape[-1] // 2
    torch.mul(grad, cos, out=out)
    out[..., :half].addcmul_(grad[..., half:], sin[..., half:])
    out[..., half:].addcmul_(grad[..., :half], sin[..., :half], value=-1)


class _RopeToHeads(torch.autograd.Function):
    """RoPE of ``t`` ``[s, b, heads, d]`` written straight into a new contiguous ``[b, heads, s, d]`` tensor."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        s, b, heads, d = t.shape
        cos, sin = _cos_sin(freqs, t.dtype)  # [1, 1, s, d]
        out = torch.empty(b, heads, s, d, dtype=t.dtype, device=t.device)
        _rotate_into(out, t.permute(1, 2, 0, 3), cos, sin)
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        cos, sin = ctx.saved_tensors
        grad_t = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
        _unrotate_into(grad_t, grad, cos, sin)
        return grad_t.permute(2, 0, 1, 3), None  # back to [s, b, heads, d]


def rope_to_heads(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """RoPE of ``t`` (``[s, b, heads, d]``, any strides) with ``freqs`` (``[s, 1, 1, d]``), as megatron-core's
    ``t * cos + rotate_half(t) * sin``, returned as a contiguous ``[b, heads, s, d]`` tensor (SDPA's layout):
    the rotation and the layout change are one pass forward and one backward."""
    return _RopeToHeads.apply(t, freqs)


class _QkvToHeads(torch.autograd.Function):
    """megatron-core's fused QKV projection output ``[s, b, groups, (heads_per_group + 2) · d]`` (per group: the
    group's query heads, its key head, its value head) → query and key with RoPE and value, each a new contiguous
    ``[b, heads, s, d]`` tensor; the backward writes all three gradients into one tensor of the input's layout."""

    @staticmethod
    def forward(ctx: Any, mixed: torch.Tensor, q_freqs: torch.Tensor, k_freqs: torch.Tensor,
                heads_per_group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        s, b, groups, width = mixed.shape
        d = width // (heads_per_group + 2)
        q_cos, q_sin = (t.unsqueeze(1) for t in _cos_sin(q_freqs, mixed.dtype))  # [1, 1, 1, s, d]
        k_cos, k_sin = _cos_sin(k_freqs, mixed.dtype)
        query, key, value = _qkv_views(mixed, heads_per_group, d)
        q = torch.empty(b, groups, heads_per_group, s, d, dtype=mixed.dtype, device=mixed.device)
        k, v = (torch.empty(b, groups, s, d, dtype=mixed.dtype, device=mixed.device) for _ in range(2))
        _rotate_into(q, query, q_cos, q_sin)
        _rotate_into(k, key, k_cos, k_sin)
        v.copy_(value)
        ctx.save_for_backward(q_cos, q_sin, k_cos, k_sin)
        ctx.shape = mixed.shape
        return q.view(b, groups * heads_per_group, s, d), k, v

    @staticmethod
    def backward(ctx: Any, grad_q: torch.Tensor | None, grad_k: torch.Tensor | None,
                 grad_v: torch.Tensor | None) -> tuple[torch.Tensor, None, None, None]:  # fmt: skip
        q_cos, q_sin, k_cos, k_sin = ctx.saved_tensors
        d = q_cos.shape[-1]
        grad = torch.empty(ctx.shape, dtype=q_cos.dtype, device=q_cos.device)
        d_query, d_key, d_value = _qkv_views(grad, ctx.shape[-1] // d - 2, d)
        for target, g, cos, sin in ((d_query, grad_q, q_cos, q_sin), (d_key, grad_k, k_cos, k_sin)):
            if g is None:
                target.zero_()
            else:
                _unrotate_into(target, g.view(target.shape), cos, sin)
        if grad_v is None:
            d_value.zero_()
        else:
            d_value.copy_(grad_v)
        return grad, None, None, None


def _qkv_views(mixed: torch.Tensor, heads_per_group: int, d: int) -> tuple[torch.Tensor, ...]:
    """Query ``[b, groups, heads_per_group, s, d]``, key and value ``[b, groups, s, d]``: views of ``mixed``."""
    query = mixed[..., : heads_per_group * d].unflatten(-1, (heads_per_group, d)).permute(1, 2, 3, 0, 4)
    key = mixed[..., heads_per_group * d : (heads_per_group + 1) * d].permute(1, 2, 0, 3)
    value = mixed[..., (heads_per_group + 1) * d :].permute(1, 2, 0, 3)
    return query, key, value


def qkv_to_heads(mixed: torch.Tensor, freqs: tuple[torch.Tensor, torch.Tensor],
                 heads_per_group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Query and key (RoPE applied) and value in SDPA's contiguous ``[b, heads, s, d]`` layout from megatron-core's
    grouped QKV projection ``mixed`` ``[s, b, groups, (heads_per_group + 2) · d]``; ``freqs`` for query and key. The
    same values as megatron-core's split, reshape and RoPE, without their copies and the backward's concatenation."""
    return _QkvToHeads.apply(mixed, freqs[0], freqs[1], heads_per_group)


class RopeSelfAttention(SelfAttention):
    """megatron-core ``SelfAttention`` whose plain RoPE is applied on the way from the fused QKV projection to SDPA's
    layout (:func:`qkv_to_heads`), or, where megatron-core's split has more to do, by the SDPA core attention."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
            _yarn_get_concentration_factor_from_config as yarn_scale,
        )
        from megatron.core.transformer.identity_op import IdentityOp

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
        # query, key and value straight from the fused projection (qkv_to_heads) where megatron-core's split has
        # nothing else to do: no QK norms, no gated output, at least one query group per TP rank, no self-tests
        self._fused_qkv = (
            self._plain_rope
            and all(norm is None or isinstance(norm, IdentityOp) for norm in (self.q_layernorm, self.k_layernorm))
            and not c.attention_output_gate and c.num_query_groups >= self.world_size and not c.test_mode
        )  # fmt: skip
        self._qkv_freqs: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                key_value_states: torch.Tensor | None = None, inference_context: Any = None,
                rotary_pos_emb: Any = None, *args: Any, **kwargs: Any) -> Any:  # fmt: skip
        """megatron-core's forward; plain RoPE is applied by :meth:`get_query_key_value_tensors` or the core
        attention instead of in between."""
        freqs = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb, rotary_pos_emb)
        if (
            not self._plain_rope or rotary_pos_emb is None or inference_context is not None or args
            or kwargs.get("inference_params") is not None or kwargs.get("packed_seq_params") is not None
            or any(f is None or f.shape[-1] != self.hidden_size_per_attention_head for f in freqs)
        ):  # fmt: skip
            return super().forward(hidden_states, attention_mask, key_value_states, inference_context,
                                   rotary_pos_emb, *args, **kwargs)  # fmt: skip
        if self._fused_qkv and key_value_states is None:
            self._qkv_freqs = freqs  # for get_query_key_value_tensors, during this call
        else:
            self.core_attention.rotary = freqs
        try:
            return super().forward(hidden_states, attention_mask, key_value_states, None, None, **kwargs)
        finally:
            self.core_attention.rotary = self._qkv_freqs = None

    def get_query_key_value_tensors(self, hidden_states: torch.Tensor, key_value_states: torch.Tensor | None = None,
                                    output_gate: bool = False, split_qkv: bool = True) -> Any:  # fmt: skip
        """megatron-core's query, key and value ``[s, b, heads, d]``; inside :meth:`forward`'s plain case they come
        with RoPE applied, as views of contiguous ``[b, heads, s, d]`` tensors (:func:`qkv_to_heads`), which the
        SDPA core attention takes without a copy."""
        freqs = self._qkv_freqs
        if freqs is not None and key_value_states is None and not output_gate and split_qkv:
            mixed, _ = self.linear_qkv(hidden_states)
            groups = self.num_query_groups_per_partition
            mixed = mixed.view(*mixed.shape[:2], groups, -1)
            heads = qkv_to_heads(mixed, freqs, self.num_attention_heads_per_partition // groups)
            return tuple(t.permute(2, 0, 1, 3) for t in heads)
        if freqs is not None:  # megatron-core's split after all: the core attention applies RoPE
            self.core_attention.rotary = freqs
        return super().get_query_key_value_tensors(hidden_states, key_value_states, output_gate=output_gate,
                                                   split_qkv=split_qkv)  # fmt: skip


def use_rope_self_attention(spec: Any) -> Any:
    """Return ``spec`` (a transformer-layer ``ModuleSpec``) with its self-attention :class:`RopeSelfAttention`."""
    attention = spec.submodules.self_attention
    if getattr(attention, "module", None) is not SelfAttention:
        raise TypeError(
            f"expected megatron-core SelfAttention in the layer spec, found {getattr(attention, 'module', attention)}"
        )
    attention.module = RopeSelfAttention
    return spec
