"""Full (TP=1) megatron-core tensors of a ``.nemo``, whatever its TP/PP, layout and naming.

Legacy archives are read lazily: a tensor's shards are read from each rank file when it is asked for,
so memory holds one tensor (plus what the caller keeps). Distributed (``model_weights/``) archives are
loaded whole. NeMo's naming variants are read too: legacy ``model.language_model.*`` names,
``model.module.`` prefixes (``megatron_amp_O2``), local-spec layer-norm names and pipeline-stage-local
layer numbers; Transformer-Engine ``_extra_state`` entries are dropped. NeVA's projector and vision
encoder tensors (NeMo-1 layout, under the word embeddings) are carried as replicated tensors.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from neva_tools.checkpoint import dist, nemo_vision
from neva_tools.checkpoint import tp as tp_rules
from neva_tools.checkpoint.nemo_archive import CONFIG_NAME, DIST_DIR, NemoArchive
from neva_tools.checkpoint.parts import Stored
from neva_tools.errors import NevaError
from neva_tools.mappings import projector
from neva_tools.mappings.base import Split
from neva_tools.mappings.llama import LOCAL_SPEC_NAMES, TABLE, LlamaArch
from neva_tools.mappings.nemo_legacy import IGNORED_LEGACY, is_legacy_name, legacy_to_mcore
from neva_tools.tokenizer.vocab import DEFAULT_DIVISIBLE_BY, padded_vocab_size
from neva_tools.utils.temporaries import scratch

logger = logging.getLogger(__name__)

_LAYER = re.compile(r"^model\.decoder\.layers\.(\d{1,9})\.(.*)$")  # a longer number is no layer: refused by name
#: The LLM's tensors outside its layers (a file holds them all or, a NeVA file of a frozen LLM, none).
_LLM_TOP = frozenset(entry.nemo for entry in TABLE if not entry.per_layer)
#: Where a dist checkpoint keeps the LLM's per-layer tensors (stacked on a leading layer axis).
_DIST_LLM_LAYERS = "model.decoder.layers."

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
    """Full tensors of a ``.nemo`` by canonical name, in table order (LLM first, then NeVA extras).

    Before any tensor is read, every stored tensor is checked against ``model_config.yaml``
    (:func:`check_stored`): the names both ways, each TP rank's shape against the shard of the full shape the
    config implies (vocabulary rows between ``vocab_size`` and its padding), floating-point dtypes equal on every
    rank, and the storage geometry (no expanded, overlapping or out-of-bounds views). All problems are listed in
    one ``NevaError``, so a caller that writes only after constructing this object never writes a bad file.
    """

    def __init__(self, archive: NemoArchive, arch: LlamaArch) -> None:
        self.archive, self.arch = archive, arch
        self.where = str(archive.path)
        cfg = model_config(archive)
        self.legacy_names = False
        self._full: dict[str, torch.Tensor] | None = None
        self._where: dict[str, list[tuple[Any, str]]] = {}
        self.entries: dict[str, Split] = {}
        if archive.layout == "dist":
            self._full = self._load_dist(cfg)
            return
        found = self._index_legacy()
        self._set_entries(cfg, found)
        stored = {}
        for name in self.entries:
            places = self._where[name]
            for rank, (shard, key) in enumerate(places):
                why = shard.geometry_problem(key) if shard.is_tensor(key) else "it is not a tensor"
                if why:
                    stored[name] = f"{_label(name, key)} on TP rank {rank} ({shard.name}): {why}"
                    break
            else:
                stored[name] = [(shard.shape(key), shard.dtype(key)) for shard, key in places]
        check_stored(self.where, cfg, self.arch, self.entries, stored, self.archive.legacy_ranks()[0],
                     labels={n: _label(n, places[0][1]) for n, places in self._where.items()})  # fmt: skip

    def _set_entries(self, cfg: dict[str, Any], found: set[str]) -> None:
        """The tensors the archive must hold (LLM, stored vision tower, NeVA extras); refuse a mismatch by name.

        The LLM's layer count is compared first, so a config claiming a huge ``num_layers`` cannot make the
        expected-name table huge."""
        layers = {int(m.group(1)) for name in found if (m := _LAYER.match(name))}
        self.has_llm = bool(layers) or bool(found & _LLM_TOP)
        neva = isinstance(cfg.get("mm_cfg"), dict)
        if self.has_llm and max(layers, default=-1) + 1 != self.arch.num_layers:
            held = f"layers 0 to {max(layers)}" if layers else "no transformer layers"
            raise NevaError(f"{self.where}: {CONFIG_NAME} says num_layers {self.arch.num_layers} but the weights hold "
                            f"{held}; fix num_layers or use the config saved with these weights")  # fmt: skip
        if not self.has_llm and not neva:
            raise NevaError(f"{self.where} holds no LLM weights (no model.embedding.word_embeddings.weight, no "
                            f"model.decoder.layers.*) and its {CONFIG_NAME} has no mm_cfg (a NeVA file of a frozen "
                            f"LLM); it holds: {', '.join(sorted(found)[:10]) or 'no tensors'}")  # fmt: skip
        if self.has_llm:
            self.entries = {name: split for name, _, split in self.arch.entries()}
        self.entries.update(nemo_vision.stored_splits(cfg, self.where))  # a trained vision tower, TP-split
        for name in sorted(found - set(self.entries)):
            if name.startswith(NEVA_REPLICATED_PREFIXES):
                self.entries[name] = Split.REPLICATED
        missing = sorted(set(self.entries) - found)
        extra = sorted(found - set(self.entries))
        if missing or extra:
            raise NevaError(
                f"{self.where}: weights do not match model_config.yaml"
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
                    places = self._where.setdefault(canon, [])
                    if len(places) == t:
                        places.append((shard, key))
                    elif len(places) == t + 1:
                        raise NevaError(f"{shard.name} stores {canon} twice, as {places[t][1]} and as {key}; "
                                        "the file is refused (which copy is meant is unknown)")  # fmt: skip
        incomplete = sorted(n for n, ranks in self._where.items() if len(ranks) != tp)
        if incomplete:
            raise NevaError(f"{self.archive.path}: tensors missing on some TP ranks: {', '.join(incomplete[:10])}")
        return set(self._where)

    def _load_dist(self, cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Check the dist checkpoint's metadata (shapes, dtypes) against the config, then load the full tensors."""
        with scratch() as tmp:
            directory = self.archive.extract_dist(tmp)
            meta = dist.tensor_metadata(directory)
            for key, (shape, _) in meta.items():
                if key.startswith(_DIST_LLM_LAYERS) and (not shape or shape[0] != self.arch.num_layers):
                    raise NevaError(f"{self.where}: {CONFIG_NAME} says num_layers {self.arch.num_layers} but "
                                    f"{DIST_DIR}/ stores {key} for {shape[0] if shape else 0} layers (its leading "
                                    "axis); fix num_layers or use the config saved with these weights")  # fmt: skip
            self.has_llm = bool(set(meta) & _LLM_TOP) or any(k.startswith(_DIST_LLM_LAYERS) for k in meta)
            if self.has_llm or not isinstance(cfg.get("mm_cfg"), dict):
                self.entries = {name: split for name, _, split in self.arch.entries()}
            self.entries.update(nemo_vision.stored_splits(cfg, self.where))
            keys = {dist.dist_key(n)[0] for n in self.entries}
            names = [n for n in self.entries if dist.dist_key(n)[0] in meta]
            unread = sorted(set(meta) - keys)
            if unread:
                logger.warning("%s: %s/ holds tensors no table names, which are not read: %s", self.where, DIST_DIR,
                               ", ".join(unread[:10]) + (" …" if len(unread) > 10 else ""))  # fmt: skip
            stored: dict[str, Any] = {}
            for name in names:
                key, layer = dist.dist_key(name)
                shape, dtype = meta[key]
                stored[name] = [(shape[1:] if layer is not None else shape, dtype)]
            missing = sorted(set(self.entries) - set(names))
            if missing:
                raise NevaError(f"{self.where}: weights do not match model_config.yaml; missing: "
                                f"{', '.join(missing[:20])}")  # fmt: skip
            check_stored(self.where, cfg, self.arch, self.entries, stored, 1)
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


def check_stored(
    where: str, cfg: dict[str, Any], arch: LlamaArch, entries: dict[str, Split], stored: dict[str, Any], tp: int,
    labels: dict[str, str] | None = None,
) -> None:  # fmt: skip
    """Refuse stored tensors that do not fit the config, listing every problem with the values on both sides.

    ``stored`` maps each name of ``entries`` to its shards' (shape, dtype), one per TP rank of the file (``tp``
    ranks; a dist checkpoint is one full-size rank), or to a problem already found (a storage geometry that is no
    stored weight). Expected full shapes come from the mapping tables and the config: the LLM's from
    ``LlamaArch.mcore_shapes``, a stored vision tower's from its family's table, NeMo-1's projector from
    ``mappings.projector`` (its input width read off the file); the word embeddings and output layer may hold
    ``vocab_size`` up to its padding (``make_vocab_size_divisible_by`` × TP) rows. NeMo-1's HF-named vision
    encoder has no table here: its tensors are checked for dtype, geometry and equality of shape across ranks.
    """
    labels = labels or {}
    expected = arch.mcore_shapes() if _LLM_TOP & set(entries) else {}  # the LLM's entries come all or none
    expected.update(nemo_vision.stored_shapes(cfg, where))
    expected.update(_projector_shapes(cfg, arch.hidden_size, stored))
    config_tp = cfg.get("tensor_model_parallel_size")
    config_tp = config_tp if isinstance(config_tp, int) and not isinstance(config_tp, bool) and config_tp > 0 else 1
    vocab = arch.vocab_size
    bound = padded_vocab_size(vocab, max(tp, config_tp), divisible_by(cfg, where))
    problems, damaged = [], 0
    for name, split in entries.items():
        found = stored[name]
        damaged += isinstance(found, str)
        problem = found if isinstance(found, str) else _shards_problem(
            labels.get(name, name), split, found, expected.get(name), tp, vocab, bound
        )  # fmt: skip
        if problem:
            problems.append(problem)
    if problems:
        fixes = []
        if damaged:
            fixes.append("a tensor that is no plain stored array means a damaged or hand-made file: re-save the "
                         "weights (torch.save of contiguous tensors) or copy the file again")  # fmt: skip
        if damaged < len(problems):
            fixes.append(f"fix {CONFIG_NAME} so that it describes these weights, or use the config saved with them")
        listed = "\n  ".join(problems[:20]) + (f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise NevaError(f"{where}: {len(problems)} stored tensor(s) do not fit {CONFIG_NAME} ({_summary(arch)}, "
                        f"{tp} TP rank(s) in the file):\n  {listed}\nThe file is refused; "
                        f"{'; '.join(fixes)}.")  # fmt: skip


def _shards_problem(
    label: str, split: Split, shards: list[tuple[tuple[int, ...], torch.dtype]], want: tuple[int, ...] | None,
    tp: int, vocab: int, bound: int,
) -> str | None:  # fmt: skip
    """What is wrong with one tensor's shards (dtype, equal shapes on every rank, the config's shape), or None."""
    shapes = [tuple(shape) for shape, _ in shards]
    for rank, (shape, dtype) in enumerate(shards):
        if not dtype.is_floating_point:
            return f"{label} on TP rank {rank} has dtype {dtype}, not a floating-point dtype"
        if dtype != shards[0][1]:
            return f"{label} is {shards[0][1]} on TP rank 0 but {dtype} on TP rank {rank}"
        if tuple(shape) != shapes[0]:
            return f"{label} has shape {list(shapes[0])} on TP rank 0 but {list(shape)} on TP rank {rank}"
    if want is None:
        return None
    shard, n = shapes[0], len(shards)
    if not shard or split is Split.REPLICATED or (split is Split.ROW and len(shard) == 1):
        full = shard
    elif split is Split.ROW:
        full = (shard[0], shard[1] * n, *shard[2:])
    else:
        full = (shard[0] * n, *shard[1:])
    found = f"{list(full)}" + (f" ({n} TP shards of {list(shard)})" if full != shard else "")
    if split is Split.VOCAB:
        if len(full) == len(want) and full[1:] == want[1:] and vocab <= full[0] <= bound:
            return None
        rows = str(vocab) if vocab == bound else f"{vocab} to {bound}"
        return f"{label} has shape {found}, expected [{', '.join([rows, *map(str, want[1:])])}]"
    try:
        part = tp_rules.shard_shape(want, split, n)
    except NevaError:
        return f"{label} has shape {found}, expected {list(want)}, which does not split evenly across {n} TP ranks"
    return None if shard == part else f"{label} has shape {found}, expected {list(want)}"


def _projector_shapes(cfg: dict[str, Any], hidden: int, stored: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Full shapes of NeMo-1's projector tensors: the LLM side from the config, the vision width off the file."""
    mm = cfg.get("mm_cfg") if isinstance(cfg.get("mm_cfg"), dict) else {}
    kind = mm.get("mm_mlp_adapter_type") or ("linear" if projector.NEMO_PREFIX + "weight" in stored else "mlp2x_gelu")
    shapes = {projector.NEWLINE.hf[0]: (hidden,)}
    first = stored.get(projector.NEMO_PREFIX + ("weight" if kind == "linear" else "0.weight"))
    if kind in projector.TABLES and isinstance(first, list) and len(first[0][0]) == 2:
        shapes.update(projector.full_shapes(kind, hidden, first[0][0][1]))
    return shapes


def _summary(arch: LlamaArch) -> str:
    """The config values the expected shapes are made of."""
    return (f"num_layers {arch.num_layers}, hidden_size {arch.hidden_size}, ffn_hidden_size {arch.ffn_hidden_size}, "
            f"num_attention_heads {arch.num_heads}, num_query_groups {arch.num_groups}, kv_channels {arch.head_dim}, "
            f"vocab_size {arch.vocab_size}")  # fmt: skip


def _label(name: str, key: str) -> str:
    """A tensor's canonical name, with the name it is stored under when that differs."""
    return name if name == key else f"{name} (stored as {key})"


def divisible_by(cfg: dict[str, Any], where: str) -> int:
    """``make_vocab_size_divisible_by`` of a model config (default 128), or our error naming a bad value."""
    value = cfg.get("make_vocab_size_divisible_by")
    if value is None:
        return DEFAULT_DIVISIBLE_BY
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise NevaError(f"{where}: {CONFIG_NAME} has make_vocab_size_divisible_by {value!r}; it must be a positive "
                        f"integer (NeMo's default is {DEFAULT_DIVISIBLE_BY})")  # fmt: skip
    return value


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
        section = cfg.get("tokenizer")
        vocab = _tokenizer_vocab_size(archive, section if isinstance(section, dict) else {})
    return cfg, LlamaArch.from_nemo_model_config(cfg, vocab, source=f"{archive.path}:{CONFIG_NAME}")


def _tokenizer_vocab_size(archive: NemoArchive, section: dict) -> int:
    """The vocabulary size of the tokenizer stored in the archive (for NeMo files without ``vocab_size``)."""
    ref = section.get("model")
    if not (isinstance(ref, str) and ref.startswith("nemo:")):
        raise NevaError(f"{archive.path}: model_config.yaml has no vocab_size and no sentencepiece tokenizer artifact")
    import sentencepiece as spm

    with scratch() as tmp:
        try:
            return spm.SentencePieceProcessor(model_file=str(archive.artifact(ref, Path(tmp)))).get_piece_size()
        except (RuntimeError, OSError) as exc:  # sentencepiece raises RuntimeError for a file it cannot parse
            raise NevaError(f"{archive.path}: model_config.yaml has no vocab_size and its tokenizer {ref} cannot be "
                            f"read ({exc}); add vocab_size to model_config.yaml") from None  # fmt: skip
