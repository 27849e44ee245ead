"""Full (TP=1) megatron-core tensors of a ``.nemo``, whatever its TP/PP and layout.

Reads NeMo's naming variants too: ``model.module.`` prefixes (``megatron_amp_O2``), local-spec layer-norm
names, pipeline-stage-local layer numbers; Transformer-Engine ``_extra_state`` entries are dropped.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from neva_tools.checkpoint import dist
from neva_tools.checkpoint import tp as tp_rules
from neva_tools.checkpoint.nemo_archive import DIST_DIR, NemoArchive
from neva_tools.errors import NevaError
from neva_tools.mappings.base import Split
from neva_tools.mappings.llama import LOCAL_SPEC_NAMES, LlamaArch

_LAYER = re.compile(r"^model\.decoder\.layers\.(\d+)\.(.*)$")


def canonical_name(name: str, layer_offset: int = 0) -> str | None:
    """Our canonical megatron-core name (TE layer-norm names, global layer numbers) or None to drop."""
    if name.endswith("_extra_state"):
        return None
    if name.startswith("model.module."):
        name = "model." + name[len("model.module.") :]
    m = _LAYER.match(name)
    if m is None:
        return name
    rest = m.group(2)
    for te_name, local_name in LOCAL_SPEC_NAMES.items():
        if rest == local_name:
            rest = te_name
    return f"model.decoder.layers.{int(m.group(1)) + layer_offset}.{rest}"


class NemoTensors:
    """Access to a ``.nemo``'s full tensors by canonical name (all of them are loaded into memory)."""

    def __init__(self, archive: NemoArchive, arch: LlamaArch) -> None:
        self.archive, self.arch = archive, arch
        self.entries = {name: split for name, _, split in arch.entries()}
        self._ranks: list[dict[str, torch.Tensor]] = []
        if archive.layout == "dist":
            self._full = self._load_dist()
        else:
            self._full = None
            self._load_legacy()
        names = set(self._full) if self._full is not None else set(self._ranks[0])
        missing = sorted(set(self.entries) - names)
        extra = sorted(names - set(self.entries))
        if missing or extra:
            raise NevaError(
                f"{archive.path}: weights do not match model_config.yaml"
                + (f"; missing: {', '.join(missing[:20])}" if missing else "")
                + (f"; unexpected: {', '.join(extra[:20])}" if extra else "")
            )

    def _load_legacy(self) -> None:
        tp, pp = self.archive.legacy_ranks()
        if self.arch.num_layers % pp:
            raise NevaError(f"pipeline_model_parallel_size ({pp}) must divide num_layers ({self.arch.num_layers})")
        per_stage = self.arch.num_layers // pp
        for t in range(tp):
            merged: dict[str, torch.Tensor] = {}
            for p in range(pp):
                for name, tensor in self.archive.load_legacy(t, p).items():
                    canon = canonical_name(name, p * per_stage)
                    if canon is not None:
                        merged[canon] = tensor
            self._ranks.append(merged)

    def _load_dist(self) -> dict[str, torch.Tensor]:
        with tempfile.TemporaryDirectory(prefix=".neva-dist-") as tmp:
            directory = self.archive.extract(DIST_DIR, tmp)
            stored = dist.tensor_shapes(directory)
            names = [n for n in self.entries if dist.dist_key(n)[0] in stored]
            return dist.load_full(names, directory, self.arch.num_layers)

    @property
    def tp(self) -> int:
        """The tensor-parallel size the archive was saved with (1 for dist checkpoints)."""
        return max(1, len(self._ranks))

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
        return tp_rules.merge([r[name] for r in self._ranks], split, name=name, vocab=vocab)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) for every tensor, in table order."""
        for name in self.entries:
            yield name, self.full(name)


def load_arch(archive: NemoArchive) -> tuple[dict, LlamaArch]:
    """The model config (unwrapped from a ``model:`` key if present) and its architecture."""
    cfg = archive.read_config()
    cfg = cfg.get("model", cfg) if isinstance(cfg.get("model"), dict) else cfg
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
