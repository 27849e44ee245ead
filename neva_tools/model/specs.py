"""The transformer-layer spec our GPT and NeVA language models are built with."""

from __future__ import annotations

from typing import Any


def gpt_local_spec(normalization: str) -> Any:
    """megatron-core's local GPT layer spec (no Transformer Engine) with SDPA core attention
    (:mod:`neva_tools.model.attention`) applying plain RoPE itself (:mod:`neva_tools.model.rope`), the
    single-function SwiGLU MLP (:mod:`neva_tools.model.swiglu`) and plain linears at TP 1
    (:mod:`neva_tools.model.linear`)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from neva_tools.model.attention import use_sdpa
    from neva_tools.model.linear import use_tp1_linears
    from neva_tools.model.rope import use_rope_self_attention
    from neva_tools.model.swiglu import use_swiglu_mlp

    spec = use_sdpa(get_gpt_layer_local_spec(normalization=normalization))
    return use_tp1_linears(use_swiglu_mlp(use_rope_self_attention(spec)))
