"""The NeVA projector: megatron-core ``vision_projection`` ↔ NeMo-1 NeVA ``mm_projector`` ↔ llava-hf names.

``mlp2x_gelu`` is Linear → GELU → Linear (``mm_projector.0`` and ``.2``); ``linear`` is one Linear.
megatron-core splits ``linear_fc1`` by columns and ``linear_fc2`` by rows; NeMo-1 keeps the projector
whole (replicated), so conversion merges/splits with the usual rules. ``mm_patch_merge_type: spatial_unpad`` adds
LLaVA-NeXT's ``image_newline`` (replicated; llava-hf ``image_newline``, NeMo-1 has none: it is stored next to
``mm_projector`` in the adapter); ``table(..., newline=True)`` includes it.
"""

from __future__ import annotations

from neva_tools.mappings.base import Entry, Split

NEMO_PREFIX = "model.embedding.word_embeddings.adapter_layer.mm_projector_adapter.mm_projector."
MCORE_PREFIX = "vision_projection.encoder."
#: LLaVA-NeXT's learned row after every feature row of an unpadded tile grid (``spatial_unpad``).
NEWLINE = Entry(
    "vision_projection.image_newline",
    ("model.embedding.word_embeddings.adapter_layer.mm_projector_adapter.image_newline", "image_newline"),
    Split.REPLICATED,
    when="image_newline",
)

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


def table(projector_type: str, *, newline: bool = False) -> tuple[Entry, ...]:
    """The entries of a projector type, with ``image_newline`` when ``newline`` (``spatial_unpad`` models)."""
    return TABLES[projector_type] + ((NEWLINE,) if newline else ())


def nemo_to_llava_hf(projector_type: str, *, newline: bool = False) -> dict[str, str]:
    """NeMo-1 ``mm_projector`` name → llava-hf ``multi_modal_projector`` name (the inverse: swap the pairs);
    ``newline``: with ``image_newline``."""
    return {entry.hf[0]: entry.hf[1] for entry in table(projector_type, newline=newline)}


def mcore_to_llava_hf(projector_type: str, *, newline: bool = False) -> dict[str, str]:
    """megatron-core ``vision_projection`` name → llava-hf ``multi_modal_projector`` name (``newline``: with
    ``image_newline``)."""
    return {entry.nemo: entry.hf[1] for entry in table(projector_type, newline=newline)}


#: LLaVA's ``mm_projector.bin`` (what ``--tune_mm_mlp_adapter`` stage 1 saves): ``model.mm_projector.<suffix>`` with
#: NeMo-1's suffixes (``0.weight`` … ``2.bias`` for mlp2x_gelu; ``weight``/``bias`` for LLaVA's ``nn.Linear``).
LLAVA_PROJECTOR = "mm_projector."


def llava_suffix(entry: Entry) -> str:
    """The part of a LLaVA ``mm_projector.bin`` key after ``mm_projector.`` for ``entry``."""
    return entry.hf[0].removeprefix(NEMO_PREFIX)


def full_shapes(projector_type: str, llm_hidden: int, vision_hidden: int) -> dict[str, tuple[int, ...]]:
    """NeMo-1 name → full (TP=1) shape of every projector tensor: Linear(vision → LLM) [→ GELU → Linear(LLM → LLM)]."""
    first = {"weight": (llm_hidden, vision_hidden), "bias": (llm_hidden,)}
    if projector_type == "linear":
        return {NEMO_PREFIX + k: v for k, v in first.items()}
    second = {"weight": (llm_hidden, llm_hidden), "bias": (llm_hidden,)}
    return {NEMO_PREFIX + f"{i}.{k}": v for i, part in ((0, first), (2, second)) for k, v in part.items()}
