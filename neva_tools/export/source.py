"""The parts of a NeVA model an export reads: config, LLM tensors, projector, vision tower, tokenizer.

Two holders share one interface: a NeVA ``.nemo`` (:class:`NemoSource`: the final model of ``neva train``, a
NeMo-1 NeVA file or a ``neva import`` result, any TP, legacy layout) and a training checkpoint
(:class:`CheckpointSource`: ``runs/NAME/checkpoints/step=N``, megatron-core ``torch_dist``). Tensors are read one at
a time, in full (TP=1) form, with the shared TP merge rules; no model is built.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from neva_tools.checkpoint import nemo_vision
from neva_tools.checkpoint import tp as tp_rules
from neva_tools.checkpoint.nemo_archive import NemoArchive
from neva_tools.checkpoint.nemo_tensors import NemoTensors, canonical_name, load_arch, model_config
from neva_tools.errors import NevaError
from neva_tools.export.vision import NEMO_VISION_PREFIX, VisionTower, mcore_to_hf, resolve_tower, stored_mcore_tower
from neva_tools.mappings.base import Split
from neva_tools.mappings.llama import LlamaArch
from neva_tools.mappings.projector import mcore_to_llava_hf, nemo_to_llava_hf
from neva_tools.model.added_vocab import with_added_rows

logger = logging.getLogger(__name__)

_EMBEDDING = "model.embedding.word_embeddings.weight"


def mm_setting(cfg: Mapping[str, Any], *path: str, default: Any = None) -> Any:
    """``cfg[path[0]][path[1]]…`` or ``default`` when a level is missing or null."""
    node: Any = cfg
    for key in path:
        node = node.get(key) if isinstance(node, Mapping) else None
    return default if node is None else node


def projector_type(cfg: Mapping[str, Any], where: str) -> str:
    """The projector type; Hugging Face LLaVA has only Linear → GELU → Linear (``mlp2x_gelu``)."""
    kind = str(mm_setting(cfg, "mm_cfg", "mm_mlp_adapter_type", default="mlp2x_gelu"))
    if kind != "mlp2x_gelu":
        raise NevaError(f"{where}: mm_cfg.mm_mlp_adapter_type is {kind!r}; Hugging Face LLaVA "
                        "(multi_modal_projector.linear_1/linear_2) needs mlp2x_gelu")  # fmt: skip
    return kind


def has_newline(cfg: Mapping[str, Any]) -> bool:
    """Whether the model has LLaVA-NeXT's ``image_newline`` (``mm_patch_merge_type: spatial_unpad``)."""
    return str(mm_setting(cfg, "mm_cfg", "mm_patch_merge_type", default="flat")) == "spatial_unpad"


def _check_same_llm(cfg: Mapping[str, Any], arch: LlamaArch, where: str, llm: Path) -> None:
    """The separate LLM ``.nemo`` must have the architecture recorded in the NeVA config."""
    try:
        expected = LlamaArch.from_nemo_model_config(cfg, arch.vocab_size)
    except KeyError as exc:
        raise NevaError(f"{where}: model_config.yaml lacks the LLM key {exc.args[0]!r}") from None
    if expected.replace(family=arch.family) != arch:
        raise NevaError(f"the LLM in {llm} ({arch}) is not the one {where} was trained with ({expected})")


class NemoSource:
    """A NeVA ``.nemo``; a stage-1 file (no LLM weights) reads them from ``llm`` or ``mm_cfg.llm.from_pretrained``."""

    def __init__(self, path: str | Path, *, llm: str | Path | None = None) -> None:
        self.where = str(path)
        self.archive = NemoArchive(path)
        self.llm_archive: NemoArchive | None = None
        try:
            self._open(llm)
        except BaseException:
            self.close()
            raise

    def _open(self, llm: str | Path | None) -> None:
        self.cfg = model_config(self.archive)
        if not isinstance(self.cfg.get("mm_cfg"), Mapping):
            raise NevaError(f"{self.where} is not a NeVA .nemo: its model_config.yaml has no mm_cfg section; for a "
                            "language model use `neva convert nemo-to-hf`")  # fmt: skip
        if self.archive.layout != "legacy":
            raise NevaError(f"{self.where} is a distributed (model_weights/) checkpoint; convert it with "
                            "`neva repartition --format legacy` first")  # fmt: skip
        kind = projector_type(self.cfg, self.where)
        tp, _ = self.archive.legacy_ranks()
        ranks = [self.archive.lazy_legacy(rank, 0) for rank in range(tp)]
        names = {key: canonical_name(key) for key in ranks[0]}
        projector = nemo_to_llava_hf(kind, newline=has_newline(self.cfg))
        missing = [n for n in projector if n not in names.values()]
        if missing:
            raise NevaError(f"{self.where} has no {kind} projector (missing {', '.join(missing)}); export needs a "
                            "NeVA .nemo written by `neva train` or `neva import`")  # fmt: skip

        def replicated(canon: str) -> torch.Tensor:
            key = next(k for k, c in names.items() if c == canon)
            return tp_rules.merge([r[key] for r in ranks], Split.REPLICATED, name=key)

        self._projector = {hf: replicated(n) for n, hf in projector.items()}
        self.vision_stored = {c: replicated(c) for c in names.values() if c and c.startswith(NEMO_VISION_PREFIX)}
        self._tower = nemo_vision.read_tower(self.archive)  # the trained layers neva train stores, else None
        llm_archive = self.archive
        if _EMBEDDING not in names.values():
            source = llm or mm_setting(self.cfg, "mm_cfg", "llm", "from_pretrained")
            if source is None or not Path(source).exists():
                raise NevaError(f"{self.where} holds no LLM weights (the LLM was frozen, so training did not store "
                                f"it) and its LLM {source} (mm_cfg.llm.from_pretrained) does not exist; pass --llm "
                                "with the LLM .nemo used for training")  # fmt: skip
            self.llm_archive = llm_archive = NemoArchive(source)
        elif llm is not None:
            raise NevaError(f"{self.where} holds its own LLM weights; --llm is only for NeVA .nemo files without them")
        _, self.arch = load_arch(llm_archive)
        if self.llm_archive is not None:
            _check_same_llm(self.cfg, self.arch, self.where, self.llm_archive.path)
        self._tensors = NemoTensors(llm_archive, self.arch)
        self._llm_vocab = self.arch.vocab_size
        trained = int(self.cfg.get("vocab_size") or self._llm_vocab)
        if trained > self._llm_vocab:  # a frozen-LLM file whose tokenizer has added tokens: rows as training set them
            self.arch = self.arch.replace(vocab_size=trained)

    def llm_tensor(self, name: str) -> torch.Tensor:
        """The full LLM tensor ``name`` (canonical megatron-core name), vocabulary padding removed; the rows of
        tokens added to the LLM's vocabulary, when the file does not store them, start values as in training."""
        tensor = self._tensors.full(name)
        if self.arch.vocab_size > self._llm_vocab and self._tensors.entries[name] is Split.VOCAB:
            tensor = with_added_rows(tensor, self._llm_vocab, self.arch.vocab_size)
        return tensor

    def projector(self) -> dict[str, torch.Tensor]:
        """The projector under llava-hf names (``multi_modal_projector.linear_1.weight`` …, ``image_newline``)."""
        return dict(self._projector)

    def vision_tower(self, vision: str | None) -> VisionTower:
        """The CLIP tower (see ``neva_tools.export.vision``), with trained tensors from the ``.nemo`` applied (NeMo-1's
        ``vision_encoder`` ones or the layers ``neva train`` stores); a file that trained its tower without storing it
        is refused unless ``vision`` names the trained tower."""
        held = self._tower is not None or bool(self.vision_stored)
        bypass = None if vision is not None else "pass --vision with the trained tower"
        nemo_vision.check_trained_tower(self.cfg, held, self.where, bypass=bypass)
        if self._tower is not None:
            return stored_mcore_tower(self.cfg, self._tower, self.where, vision)
        if vision is not None and nemo_vision.tower_trained(self.cfg) and not held:
            logger.warning("%s does not store its trained vision tower; exporting --vision %s as that tower",
                           self.where, vision)  # fmt: skip
        return resolve_tower(self.cfg, self.vision_stored, self.where, vision)

    def tokenizer(self, dest: Path) -> Path:
        """Extract the tokenizer used for training (sentencepiece model or HF directory) into ``dest``."""
        from neva_tools.model.neva_io import extract_tokenizer

        try:
            return extract_tokenizer(self.archive.path, dest)
        except NevaError:
            llm = mm_setting(self.cfg, "mm_cfg", "llm", "from_pretrained")
            llm = self.llm_archive.path if self.llm_archive is not None else llm
            if llm is None or not Path(llm).exists():
                raise
            logger.info("%s stores no usable tokenizer; using the LLM's (%s)", self.where, llm)
            return extract_tokenizer(llm, dest)

    def close(self) -> None:
        """Close the archives."""
        self.archive.close()
        if self.llm_archive is not None:
            self.llm_archive.close()

    def __enter__(self) -> NemoSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CheckpointSource:
    """A ``torch_dist`` training checkpoint of a NeVA run, described by the run's config ``cfg``.

    ``cfg`` is a NeVA model config (LLM keys, ``mm_cfg``, ``data``, ``vision``) and ``tokenizer_from`` the run's
    tokenizer (a sentencepiece model, a HF directory, or a ``.nemo`` storing it). Stacked per-layer tensors are
    loaded one key at a time. A text-pretraining checkpoint (``text_only``: the GPT alone, ``cfg`` its LLM keys)
    gives its LLM tensors only.
    """

    def __init__(self, directory: str | Path, cfg: Mapping[str, Any], tokenizer_from: str | Path) -> None:
        from megatron.core import dist_checkpointing

        from neva_tools.checkpoint.dist import single_process_group
        from neva_tools.checkpoint.safe_dist import check_directory

        self.where, self.directory = str(directory), Path(directory)
        check_directory(self.directory)
        self.cfg, self.tokenizer_from = dict(cfg), Path(tokenizer_from)
        self.arch = LlamaArch.from_nemo_model_config(self.cfg)
        with single_process_group():
            meta = dist_checkpointing.load_tensors_metadata(str(self.directory))
        self.meta = {k: (tuple(m.global_shape), m.dtype) for k, m in meta.items() if k.startswith("model.")}
        self._cache: tuple[str, torch.Tensor] | None = None
        # A text-pretraining run (model.text_pretrain) trains the GPT alone: model.decoder.* rather than
        # model.language_model.decoder.*, and no projector or vision tower.
        self.text_only = _EMBEDDING in self.meta and not any(k.startswith("model.language_model.") for k in self.meta)
        self._kind = None if self.text_only else projector_type(self.cfg, self.where)
        if not self.text_only and not self.meta.keys() >= {f"model.{n}" for n in mcore_to_llava_hf(self._kind)}:
            raise NevaError(f"{self.where} is neither a NeVA training checkpoint (no model.vision_projection tensors) "
                            f"nor a text-pretraining one (no {_EMBEDDING})")  # fmt: skip

    def _stacked(self, key: str) -> torch.Tensor:
        """The whole stored tensor ``key`` (all layers), cached until another key is read."""
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing import ShardedTensor

        from neva_tools.checkpoint.dist import single_process_group
        from neva_tools.checkpoint.safe_dist import refusals_unwrapped

        if self._cache is None or self._cache[0] != key:
            if key not in self.meta:
                raise NevaError(f"{self.where} has no tensor {key}; it does not fit the run's config")
            self._cache = None
            shape, dtype = self.meta[key]
            request = {key: ShardedTensor.from_rank_offsets(key, torch.empty(shape, dtype=dtype, device="cpu"))}
            with single_process_group(), refusals_unwrapped():
                self._cache = (key, dist_checkpointing.load(request, str(self.directory))[key])
        return self._cache[1]

    def _tensor(self, name: str) -> torch.Tensor:
        """A stored tensor by its per-layer name (``model.language_model.decoder.layers.3.…``)."""
        parts = name.split(".layers.", 1)
        if len(parts) == 2 and parts[1].split(".", 1)[0].isdigit():
            layer, rest = parts[1].split(".", 1)
            return self._stacked(f"{parts[0]}.layers.{rest}")[int(layer)]
        return self._stacked(name)

    def llm_tensor(self, name: str) -> torch.Tensor:
        """The full LLM tensor ``name`` (canonical megatron-core name), vocabulary padding removed."""
        prefix = "model." if self.text_only else "model.language_model."
        tensor = self._tensor(prefix + name.removeprefix("model."))
        if name in (_EMBEDDING, "model.output_layer.weight"):
            tensor = tensor[: self.arch.vocab_size]
        return tensor

    def projector(self) -> dict[str, torch.Tensor]:
        """The projector under llava-hf names (with ``image_newline`` for ``spatial_unpad`` models)."""
        self._neva_only("a projector")
        names = mcore_to_llava_hf(self._kind, newline=has_newline(self.cfg))
        return {hf: self._stacked("model." + n) for n, hf in names.items()}

    def _neva_only(self, what: str) -> None:
        if self.text_only:
            raise NevaError(f"{self.where} is a text-pretraining checkpoint (the LLM alone): it has no {what}; "
                            "convert its LLM with `neva convert nemo-to-hf --all-checkpoints`")  # fmt: skip

    def vision_tower(self, vision: str | None) -> VisionTower:
        """The CLIP/SigLIP tower from the run's source, with the checkpoint's (possibly trained) layers applied."""
        self._neva_only("vision tower")
        tower = resolve_tower(self.cfg, {}, self.where, vision)
        select = int(mm_setting(self.cfg, "mm_cfg", "vision_encoder", "vision_select_layer", default=-2))
        prefix = "model.vision_model."
        mcore = {}
        for key in [k for k in self.meta if k.startswith(prefix)]:
            stacked = self._stacked(key)
            name = key.removeprefix(prefix)
            if name.startswith("decoder.layers."):
                rest = name.removeprefix("decoder.layers.")
                mcore.update({f"decoder.layers.{i}.{rest}": stacked[i] for i in range(stacked.shape[0])})
            else:
                mcore[name] = stacked
        tower.override(mcore_to_hf(mcore, tower.arch, select), self.where)
        return tower

    def tokenizer(self, dest: Path) -> Path:
        """The run's tokenizer: ``tokenizer_from`` itself, or extracted into ``dest`` when it is a ``.nemo``."""
        from neva_tools.model.neva_io import extract_tokenizer

        source = self.tokenizer_from
        if source.suffix == ".nemo" or (source / "model_config.yaml").is_file():
            return extract_tokenizer(source, dest)
        if not source.exists():
            raise NevaError(f"the run's tokenizer {source} does not exist")
        return source

    def close(self) -> None:
        """Drop the cached tensor."""
        self._cache = None

    def __enter__(self) -> CheckpointSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: Either holder of a NeVA model; both have ``where``, ``cfg``, ``arch`` and the reading methods above.
NevaSource = NemoSource | CheckpointSource
