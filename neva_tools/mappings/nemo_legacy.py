"""NeMo's legacy (``mcore_gpt: False``) GPT parameter names ↔ megatron-core names.

Legacy NeMo checkpoints use ``model.language_model.*`` names. The tensors themselves need no re-layout:
legacy ``query_key_value`` is already group-major ([q heads of a group, k, v] per KV group, which for
multi-head attention is NeMo's per-head [q_h, k_h, v_h]), and ``fast-swiglu``'s ``dense_h_to_4h`` holds
[gate; up] per rank like ``linear_fc1``. NeVA's projector and vision encoder live under the word
embeddings in both namings.
"""

from __future__ import annotations

import re

_LEGACY = "model.language_model."
_PAIRS: tuple[tuple[str, str], ...] = (
    ("embedding.word_embeddings.", "model.embedding.word_embeddings."),
    ("encoder.final_layernorm.", "model.decoder.final_layernorm."),
    ("output_layer.", "model.output_layer."),
)
_LAYER_PAIRS: tuple[tuple[str, str], ...] = (
    ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"),
    ("input_layernorm.bias", "self_attention.linear_qkv.layer_norm_bias"),
    ("self_attention.query_key_value.", "self_attention.linear_qkv."),
    ("self_attention.dense.", "self_attention.linear_proj."),
    ("post_attention_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"),
    ("post_attention_layernorm.bias", "mlp.linear_fc1.layer_norm_bias"),
    ("mlp.dense_h_to_4h.", "mlp.linear_fc1."),
    ("mlp.dense_4h_to_h.", "mlp.linear_fc2."),
)
#: Legacy tensors that are recomputed buffers, not weights.
IGNORED_LEGACY = ("model.language_model.rotary_pos_emb.inv_freq",)

_LEGACY_LAYER = re.compile(r"^model\.language_model\.encoder\.layers\.(\d+)\.(.*)$")
_MCORE_LAYER = re.compile(r"^model\.decoder\.layers\.(\d+)\.(.*)$")


def is_legacy_name(name: str) -> bool:
    """True for a ``model.language_model.*`` name."""
    return name.startswith(_LEGACY)


def legacy_to_mcore(name: str) -> str:
    """Legacy NeMo name → megatron-core name (``…layers.3.mlp.dense_4h_to_h.weight`` → ``…linear_fc2.weight``)."""
    m = _LEGACY_LAYER.match(name)
    if m:
        rest = m.group(2)
        for old, new in _LAYER_PAIRS:
            if rest.startswith(old):
                return f"model.decoder.layers.{m.group(1)}.{new}{rest[len(old) :]}"
        return f"model.decoder.layers.{m.group(1)}.{rest}"
    for old, new in _PAIRS:
        if name.startswith(_LEGACY + old):
            return new + name[len(_LEGACY + old) :]
    return name


def mcore_to_legacy(name: str) -> str:
    """The inverse of ``legacy_to_mcore``."""
    m = _MCORE_LAYER.match(name)
    if m:
        rest = m.group(2)
        for old, new in _LAYER_PAIRS:
            if rest.startswith(new):
                return f"{_LEGACY}encoder.layers.{m.group(1)}.{old}{rest[len(new) :]}"
        return f"{_LEGACY}encoder.layers.{m.group(1)}.{rest}"
    for old, new in _PAIRS:
        if name.startswith(new):
            return _LEGACY + old + name[len(new) :]
    return name
