"""Plain RoPE applied inside the SDPA core attention, without megatron-core's slicing copies.

megatron-core's unfused ``_apply_rotary_pos_emb_bshd`` splits query and key into a rotated part and a pass-through
part, rotates, and concatenates the two again, even when the pass-through part is empty (``rotary_percent`` 1.0,
as in every LLaMA-style model). The forward then copies query and key once more, and the backward builds two
zero-filled full-size gradients for the slices and adds them. :class:`RopeSelfAttention` hands the rotary
frequencies to :class:`~neva_tools.model.attention.SdpaDotProductAttention`, which applies :func:`rotate`
(the same arithmetic, ``t * cos + rotate_half(t) * sin``) just before attention.

Only the plain case goes this way: training (no inference context), no packed THD sequences, no context parallelism,
non-interleaved rotary over the whole head, no YaRN scale, no fused RoPE and no activation recompute. Everything else
is megatron-core's own path.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.transformer.attention import SelfAttention


def rotate(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """RoPE of ``t`` (``[s, b, heads, d]``) with ``freqs`` (``[s, 1, 1, d]``, the two halves repeated)."""
    cos, sin = torch.cos(freqs).to(t.dtype), torch.sin(freqs).to(t.dtype)
    first, second = torch.chunk(t, 2, dim=-1)
    return t * cos + torch.cat((-second, first), dim=-1) * sin


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
