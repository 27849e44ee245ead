"""The vocabulary of mapping tables: split kinds and table entries.

A table entry says how one megatron-core (``.nemo``) tensor is made from Hugging Face tensors and how
it is split across tensor-parallel ranks. Conversion (HF ↔ .nemo) and repartitioning (TP → TP) read
the same tables, so the split rules live in one place (``neva_tools.checkpoint.tp``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Split(StrEnum):
    """How a tensor is distributed over tensor-parallel ranks (megatron-core semantics)."""

    COLUMN = "column"  # split dim 0 (column-parallel linear weight/bias)
    ROW = "row"  # split dim 1 (row-parallel linear weight)
    REPLICATED = "replicated"  # every rank holds a full copy (norms, row-parallel biases)
    QKV = "qkv"  # fused QKV, split dim 0 by whole KV groups
    GATED_MLP = "gated_mlp"  # [gate; up], gate and up split separately: rank r holds [gate_r; up_r]
    VOCAB = "vocab"  # vocab-parallel embedding/output: padded, then split dim 0


@dataclass(frozen=True)
class Entry:
    """One megatron-core tensor: its name, the HF tensors it is built from, and its split kind.

    ``nemo`` and ``hf`` are templates; ``{i}`` is the layer index. ``when`` names an architecture
    flag (an attribute of the family's architecture object) that must be true for the entry to exist.
    """

    nemo: str
    hf: tuple[str, ...]
    split: Split
    when: str | None = None

    @property
    def per_layer(self) -> bool:
        """True when the entry is repeated for every transformer layer."""
        return "{i}" in self.nemo

    def expand(self, layer: int | None = None) -> tuple[str, tuple[str, ...]]:
        """The concrete (nemo name, hf names) for ``layer`` (ignored for non-layer entries)."""
        if not self.per_layer:
            return self.nemo, self.hf
        return self.nemo.format(i=layer), tuple(h.format(i=layer) for h in self.hf)
