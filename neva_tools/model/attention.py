"""Core attention through ``torch.nn.functional.scaled_dot_product_attention`` for the local (non-TE) specs.

megatron-core's local ``DotProductAttention`` materializes the ``[b, heads, s, s]`` scores with ``baddbmm``,
a softmax module and ``bmm``; PyTorch's SDPA computes the same thing in one fused kernel (flash / memory-efficient
on GPU, a fused C++ kernel on CPU) without keeping the probabilities for backward. This subclass keeps everything
megatron-core's class sets up (per-partition head counts, softmax scale, dropout, the TP RNG tracker) and only
replaces ``forward``; features SDPA cannot express (learnable/off-by-one softmax offsets, sliding windows,
attention bias) fall back to the parent. Masks follow megatron's convention: ``True`` marks a *masked* position.

It is plugged into the specs by :func:`use_sdpa`; the weights and state-dict keys are unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from neva_tools.model.rope import rope_to_heads


class SdpaDotProductAttention(DotProductAttention):
    """``DotProductAttention`` computed by ``scaled_dot_product_attention`` (same inputs, outputs and parameters).

    ``rotary`` (query and key frequencies) is set for one call by :class:`~neva_tools.model.rope.RopeSelfAttention`,
    which leaves plain RoPE to this class.
    """

    rotary: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: AttnMaskType | None = None,
                attention_bias: torch.Tensor | None = None, packed_seq_params: Any = None) -> torch.Tensor:  # fmt: skip
        """``query`` ``[sq, b, np, hn]``, ``key``/``value`` ``[sk, b, ng, hn]`` → context ``[sq, b, np * hn]``."""
        if self.softmax_offset is not None or attention_bias is not None or self.scale_mask_softmax.window_size:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)  # fmt: skip
        assert packed_seq_params is None, "packed sequences use a block-diagonal attention_mask with the local spec"
        sq, sk = query.size(0), key.size(0)
        # [b, heads, s, hn], contiguous: megatron's [s, b, ...] views put consecutive positions b × heads × hn apart,
        # which the fused CPU kernel walks more slowly than one copy costs (about 1% of a training step)
        v = value.permute(1, 2, 0, 3).contiguous()
        if self.rotary is not None:  # RoPE and that copy in one pass
            q, k = rope_to_heads(query, self.rotary[0]), rope_to_heads(key, self.rotary[1])
        else:
            q, k = (t.permute(1, 2, 0, 3).contiguous() for t in (query, key))
        scale = self.softmax_scale * (self.layer_number if self.config.apply_query_key_layer_scaling else 1)
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        is_causal, allowed = False, None
        if attention_mask is not None:
            allowed = ~attention_mask.bool()
        elif mask_type == AttnMaskType.causal and sq > 1:
            if sq == sk:
                is_causal = True
            else:  # a prefix is cached: the queries are the last sq positions (bottom-right aligned)
                allowed = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
        dropout = self.attention_dropout.p if self.training else 0.0
        gqa = q.size(1) != k.size(1)
        if gqa and allowed is not None and q.is_cuda:  # masked GQA runs the O(s²)-memory math kernel: share heads here
            k, v = (t.repeat_interleave(q.size(1) // t.size(1), dim=1) for t in (k, v))
            gqa = False

        def attend() -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, dropout_p=dropout, is_causal=is_causal, scale=scale, enable_gqa=gqa
            )

        if dropout and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = attend()
        else:
            context = attend()
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, q.size(0), self.hidden_size_per_partition)


def use_sdpa(spec: Any) -> Any:
    """Return ``spec`` (a transformer-layer ``ModuleSpec``) with its self-attention's core attention set to SDPA."""
    attention = spec.submodules.self_attention.submodules
    if attention.core_attention is not DotProductAttention:
        raise TypeError(f"expected a local spec with DotProductAttention, found {attention.core_attention}")
    attention.core_attention = SdpaDotProductAttention
    return spec
