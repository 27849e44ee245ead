"""The NeVA projector: megatron-core ``vision_projection`` ↔ NeMo-1 NeVA ``mm_projector`` ↔ llava-hf names.

``mlp2x_gelu`` is Linear → GELU → Linear (``mm_projector.0`` and ``.2``); ``linear`` is one Linear.
megatron-core splits ``linear_fc1`` by columns and ``linear_fc2`` by rows; NeMo-1 keeps the projector
whole (replicated), so conversion merges/splits with the usual rules.
"""

from __future__ import annotations

from neva_tools.mappings.base import Entry, Split

NEMO_PREFIX = "model.embedding.word_embeddings.adapter_layer.mm_projector_adapter.mm_projector."
MCORE_PREFIX = "vision_projection.encoder."

#: (megatron-core name, NeMo-1 name, llava-hf name) with the megatron-core split kind.
TABLES: dict[str, tuple[Entry, ...]] = {
    "mlp2x_gelu": (
        Entry(
            MCORE_PREFIX + "linear_fc1.weight",
            (NEMO_PREFIX + "0.weight", "multi_modal_projector.linear_1.weight"),
            Split.COLUMN,
        ),
        Entry(
            MCORE_PREFIX + "linear_fc1.bias",
            (NEMO_PREFIX + "0.bias", "multi_modal_projector.linear_1.bias"),
            Split.COLUMN,
        ),
        Entry(
            MCORE_PREFIX + "linear_fc2.weight",
            (NEMO_PREFIX + "2.weight", "multi_modal_projector.linear_2.weight"),
            Split.ROW,
        ),
        Entry(
            MCORE_PREFIX + "linear_fc2.bias",
            (NEMO_PREFIX + "2.bias", "multi_modal_projector.linear_2.bias"),
            Split.REPLICATED,
        ),
    ),
    "linear": (
        Entry(
            "vision_projection.encoder.weight",
            (NEMO_PREFIX + "weight", "multi_modal_projector.linear_1.weight"),
            Split.COLUMN,
        ),
        Entry(
            "vision_projection.encoder.bias",
            (NEMO_PREFIX + "bias", "multi_modal_projector.linear_1.bias"),
            Split.COLUMN,
        ),
    ),
}


def table(projector_type: str) -> tuple[Entry, ...]:
    """The entries of a projector type."""
    return TABLES[projector_type]


def nemo_to_llava_hf(projector_type: str) -> dict[str, str]:
    """NeMo-1 ``mm_projector`` name → llava-hf ``multi_modal_projector`` name (the inverse: swap the pairs)."""
    return {entry.hf[0]: entry.hf[1] for entry in table(projector_type)}


def mcore_to_llava_hf(projector_type: str) -> dict[str, str]:
    """megatron-core ``vision_projection`` name → llava-hf ``multi_modal_projector`` name."""
    return {entry.nemo: entry.hf[1] for entry in table(projector_type)}
