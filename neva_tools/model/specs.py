"""The transformer-layer and block specs our GPT and NeVA language models are built with."""

from __future__ import annotations

import logging
from typing import Any


class _SubclassedMlpFilter(logging.Filter):
    """megatron-core's ``TransformerLayer`` logs "Unknown MLP type ... Using default kwargs" for any MLP class other
    than ``MLP`` itself, once per layer. For :class:`~neva_tools.model.swiglu.SwiGluMLP` (an ``MLP`` subclass) the
    default is the same TP group the layer would pass, so the message says nothing; this filter drops it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Unknown MLP type")


_FILTER = _SubclassedMlpFilter()


def gpt_local_spec(normalization: str) -> Any:
    """megatron-core's local GPT layer spec (no Transformer Engine) with SDPA core attention
    (:mod:`neva_tools.model.attention`), self-attention that applies plain RoPE on the way into SDPA's layout
    (:mod:`neva_tools.model.rope`), the single-function SwiGLU MLP (:mod:`neva_tools.model.swiglu`), plain linears
    at TP 1 (:mod:`neva_tools.model.linear`) and RMSNorm with a direct CPU backward (:mod:`neva_tools.model.norm`)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from neva_tools.model.attention import use_sdpa
    from neva_tools.model.linear import use_tp1_linears
    from neva_tools.model.norm import use_torch_norm
    from neva_tools.model.rope import use_rope_self_attention
    from neva_tools.model.swiglu import use_swiglu_mlp

    layer_logger = logging.getLogger("megatron.core.transformer.transformer_layer")
    if _FILTER not in layer_logger.filters:
        layer_logger.addFilter(_FILTER)
    spec = use_sdpa(get_gpt_layer_local_spec(normalization=normalization))
    return use_torch_norm(use_tp1_linears(use_swiglu_mlp(use_rope_self_attention(spec))))


def gpt_block_spec(config: Any) -> Any:
    """The decoder-block spec for ``config`` (a megatron-core ``TransformerConfig``): :func:`gpt_local_spec` for
    each layer this pipeline stage builds, and megatron-core's default final norm, as
    :class:`~neva_tools.model.norm.TorchNorm` where that default is ``WrappedTorchNorm``."""
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_block import (
        LayerNormImpl,
        TransformerBlock,
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    from neva_tools.model.norm import TorchNorm

    layer = gpt_local_spec(config.normalization)
    final_norm = TorchNorm if LayerNormImpl is WrappedTorchNorm else LayerNormImpl  # megatron-core's default else
    blocks = TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config), layer_norm=final_norm)
    return ModuleSpec(module=TransformerBlock, submodules=blocks)
