"""Full (TP=1) megatron-core tensors of a ``.nemo``, whatever its TP/PP, layout and naming.

Legacy archives are read lazily: a tensor's shards are read from each rank file when it is asked for,
so memory holds one tensor (plus what the caller keeps). Distributed (``model_weights/``) archives are
loaded whole. NeMo's naming variants are read too: legacy ``model.language_model.*`` names,
``model.module.`` prefixes (``megatron_amp_O2``), local-spec layer-norm names and pipeline-stage-local
layer numbers; Transformer-Engine ``_extra_state`` entries are dropped. NeVA's projector and vision
encoder tensors (NeMo-1 layout, under the word embeddings) are carried as replicated tensors.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from neva_tools.checkpoint import dist, nemo_vision
from neva_tools.checkpoint import tp as tp_rules
from neva_tools.checkpoint.nemo_archive import NemoArchive
from neva_tools.checkpoint.parts import Stored
from neva_tools.errors import NevaError
from neva_tools.mappings.base import Split
from neva_tools.mappings.llama import LOCAL_SPEC_NAMES, LlamaArch
from neva_tools.mappings.nemo_legacy import IGNORED_LEGACY, is_legacy_name, legacy_to_mcore

_LAYER = re.compile(r"^model\.decoder\.layers\.(\d+)\.(.*)$")

#: NeMo-1 NeVA tensors that are not tensor-parallel (plain ``nn.Linear`` projector, HF CLIP encoder).
NEVA_REPLICATED_PREFIXES = (
    "model.embedding.word_embeddings.adapter_layer.",
    "model.embedding.word_embeddings.vision_encoder.",
)


def canonical_name(name: str, layer_offset: int = 0) -> str | None:
    """Our canonical megatron-core name (TE layer-norm names, global layer numbers), or None to drop."""
    if name.endswith("_extra_state") or name in IGNORED_LEGACY:
        return None
    if name.startswith("model.module."):
        name = "model." + name[len("model.module.") :]
    if is_legacy_name(name):
        name = legacy_to_mcore(name)
    m = _LAYER.match(name)
    if m is None:
        return name
    rest = m.group(2)
    for te_name, local_name in LOCAL_SPEC_NAMES.items():
        if rest == local_name:
            rest = te_name
    return f"model.decoder.layers.{int(m.group(1)) + layer_offset}.{rest}"


class NemoTensors:
    """Full tensors of a ``.nemo`` by canonical name, in table order (LLM first, then NeVA extras)."""

    def __init__(self, archive: NemoArchive, arch: LlamaArch) -> None:
        self.archive, self.arch = archive, arch
        self.entries: dict[str, Split] = {name: split for name, _, split in arch.entries()}
        cfg = model_config(archive)
        self.entries.update(nemo_vision.stored_splits(cfg, str(archive.path)))  # a trained vision tower, TP-split
        self.legacy_names = False
        self._full: dict[str, torch.Tensor] | None = None
        self._where: dict[str, list[tuple[Any, str]]] = {}
        if archive.layout == "dist":
            self._full = self._load_dist()
            found = set(self._full)
        else:
            found = self._index_legacy()
        llm = [name for name, _, _ in arch.entries()]
        self.has_llm = bool(found & set(llm))
        if not self.has_llm and isinstance(cfg.get("mm_cfg"), dict):  # a NeVA file of a frozen LLM stores none
            for name in llm:
                del self.entries[name]
        for name in sorted(found - set(self.entries)):
            if name.startswith(NEVA_REPLICATED_PREFIXES):
                self.entries[name] = Split.REPLICATED
        missing = sorted(set(self.entries) - found)
        extra = sorted(found - set(self.entries))
        if missing or extra:
            raise NevaError(
                f"{archive.path}: weights do not match model_config.yaml"
                + (f"; missing: {', '.join(missing[:20])}" if missing else "")
                + (f"; unexpected: {', '.join(extra[:20])}" if extra else "")
            )

    def _index_legacy(self) -> set[str]:
        tp, pp = self.archive.legacy_ranks()
        if self.arch.num_layers % pp:
            raise NevaError(f"pipeline_model_parallel_size ({pp}) must divide num_layers ({self.arch.num_layers})")
        per_stage = self.arch.num_layers // pp
        for p in range(pp):
            for t in range(tp):
                shard = self.archive.lazy_legacy(t, p)
                for key in shard:
                    self.legacy_names |= is_legacy_name(key)
                    canon = canonical_name(key, p * per_stage)
                    if canon is None or (self.arch.tied and canon == "model.output_layer.weight"):
                        continue  # tied embeddings: the last pipeline stage's copy of the embedding
                    if p > 0 and canon == "model.embedding.word_embeddings.weight":
                        continue  # legacy NeMo keeps that copy under the embedding's own name
                    self._where.setdefault(canon, [])
                    if len(self._where[canon]) == t:
                        self._where[canon].append((shard, key))
        incomplete = sorted(n for n, ranks in self._where.items() if len(ranks) != tp)
        if incomplete:
            raise NevaError(f"{self.archive.path}: tensors missing on some TP ranks: {', '.join(incomplete[:10])}")
        return set(self._where)

    def _load_dist(self) -> dict[str, torch.Tensor]:
        with tempfile.TemporaryDirectory(prefix=".neva-dist-") as tmp:
            directory = self.archive.extract_dist(tmp)
            stored = dist.tensor_shapes(directory)
            names = [n for n in self.entries if dist.dist_key(n)[0] in stored]
            return dist.load_full(names, directory, self.arch.num_layers)

    @property
    def tp(self) -> int:
        """The tensor-parallel size the archive was saved with (1 for dist checkpoints)."""
        return 1 if self._full is not None else self.archive.legacy_ranks()[0]

    def names(self) -> list[str]:
        """Canonical names in table order."""
        return list(self.entries)

    def full(self, name: str) -> torch.Tensor:
        """The full tensor ``name`` with vocabulary padding removed."""
        split = self.entries[name]
        vocab = self.arch.vocab_size if split is Split.VOCAB else None
        if self._full is not None:
            tensor = self._full[name]
            return tensor[:vocab] if vocab is not None else tensor
        shards = [shard[key] for shard, key in self._where[name]]
        return tp_rules.merge(shards, split, name=name, vocab=vocab)

    def shape(self, name: str) -> tuple[int, ...]:
        """The full tensor's shape (vocabulary padding removed), without reading it."""
        split = self.entries[name]
        if self._full is not None:
            shape = tuple(self._full[name].shape)
        else:
            shard, key = self._where[name][0]
            shape, n = shard.shape(key), len(self._where[name])
            if split is Split.ROW and len(shape) == 2:
                shape = (shape[0], shape[1] * n)
            elif split is not Split.REPLICATED and not (split is Split.ROW and len(shape) == 1):
                shape = (shape[0] * n, *shape[1:])
        return (self.arch.vocab_size, *shape[1:]) if split is Split.VOCAB else shape

    def stored(self, name: str) -> list[Stored]:
        """The stored pieces of ``name`` (one per source TP rank; the full tensor for dist archives)."""
        if self._full is not None:
            tensor = self._full[name]
            return [Stored(None, tuple(tensor.shape), tensor.dtype)]
        return [Stored(shard.locate(key), shard.shape(key), shard.dtype(key)) for shard, key in self._where[name]]

    def part(self, name: str, tp: int, rank: int, padded: int) -> torch.Tensor:
        """Target TP ``rank``'s part of ``name``; from a one-rank legacy source only that part's rows are read."""
        split = self.entries[name]
        ranges = None
        if self._full is None and len(self._where[name]) == 1:
            ranges = _row_ranges(split, self.shape(name)[0], tp, rank, padded)
        if ranges is None:
            return tp_rules.shard(self.full(name), split, tp, rank, padded_vocab=padded)
        shard, key = self._where[name][0]
        parts = [shard.rows(key, start, stop) for start, stop in ranges]
        out = torch.cat(parts) if len(parts) > 1 else parts[0]
        if split is Split.VOCAB:
            out = tp_rules.pad_rows(out, padded // tp)
        return out

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) for every tensor, in table order."""
        for name in self.entries:
            yield name, self.full(name)


def _row_ranges(split: Split, rows: int, tp: int, rank: int, padded: int) -> list[tuple[int, int]] | None:
    """The dim-0 row ranges of a full tensor that make up a rank's part, for splits that take whole rows."""
    if split is Split.VOCAB:
        step = padded // tp
        start = min(rank * step, rows)
        return [(start, min((rank + 1) * step, rows))]
    if tp == 1:
        return None
    if split in (Split.COLUMN, Split.QKV) and rows % tp == 0:
        step = rows // tp
        return [(rank * step, (rank + 1) * step)]
    if split is Split.GATED_MLP and rows % (2 * tp) == 0:
        half, step = rows // 2, rows // (2 * tp)
        return [(rank * step, (rank + 1) * step), (half + rank * step, half + (rank + 1) * step)]
    return None


def model_config(archive: NemoArchive) -> dict[str, Any]:
    """The archive's model config, unwrapped from a ``model:`` key if present."""
    cfg = archive.read_config()
    return cfg["model"] if isinstance(cfg.get("model"), dict) else cfg


def load_arch(archive: NemoArchive) -> tuple[dict[str, Any], LlamaArch]:
    """The model config and its architecture (vocabulary size from the config or the stored tokenizer)."""
    cfg = model_config(archive)
    vocab = cfg.get("vocab_size")
    if vocab is None:
        vocab = _tokenizer_vocab_size(archive, cfg.get("tokenizer") or {})
    return cfg, LlamaArch.from_nemo_model_config(cfg, vocab)


def _tokenizer_vocab_size(archive: NemoArchive, section: dict) -> int:
    """The vocabulary size of the tokenizer stored in the archive (for NeMo files without ``vocab_size``)."""
    ref = section.get("model")
    if not (isinstance(ref, str) and ref.startswith("nemo:")):
        raise NevaError(f"{archive.path}: model_config.yaml has no vocab_size and no sentencepiece tokenizer artifact")
    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as tmp:
        return spm.SentencePieceProcessor(model_file=str(archive.artifact(ref, Path(tmp)))).get_piece_size()
