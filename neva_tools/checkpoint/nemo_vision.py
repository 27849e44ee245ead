"""The vision tower inside a NeVA ``.nemo``: tensor names, the config record, TP splits and reading it back.

When ``neva train`` trains the vision tower (``mm_cfg.vision_encoder.freeze: false``), or starts from a ``.nemo``
holding a trained one, the final ``.nemo`` stores the tower like the LLM: each TP rank's weights file holds its
shard of megatron-core's ``CLIPViTModel`` tensors under ``LLaVAModel``'s names (``model.vision_model.*``), split
by the CLIP/SigLIP tables' kinds (``neva_tools.mappings.clip``, ``.siglip``). Only the layers the model runs are
stored: those up to ``mm_cfg.vision_encoder.vision_select_layer``. The config records it in its ``vision`` section::

    vision:
      arch: {model_type: clip, image_size: 336, patch_size: 14, hidden_size: 1024, num_layers: 24, ...}
      stored: true   # model.vision_model.* holds the tower's weights

so a reader rebuilds the tower without the original checkpoint. NeMo-1 NeVA files keep a trained tower whole and
replicated under ``model.embedding.word_embeddings.vision_encoder.*`` (HF names; ``neva import`` writes that form).
A file whose config says the tower trained but which holds neither (written before the tower was stored) is refused
by the readers (:func:`check_trained_tower`): they would otherwise run the original, untrained tower.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from neva_tools.errors import NevaError
from neva_tools.mappings import clip, siglip
from neva_tools.mappings.base import Split
from neva_tools.mappings.clip import ClipVisionArch

if TYPE_CHECKING:
    from neva_tools.checkpoint.nemo_archive import NemoArchive

#: ``LLaVAModel``'s vision tower under the archive's ``model.`` prefix (what training checkpoints call it too).
PREFIX = "model.vision_model."
#: NeMo-1 NeVA's (trained) HF CLIP tower, replicated on every rank.
NEMO1_PREFIX = "model.embedding.word_embeddings.vision_encoder."
#: The remedy for a file that should hold a trained tower but does not.
FROM_CHECKPOINTS = (
    "the trained tower exists only in that run's checkpoints (runs/NAME/checkpoints/step=N): export them with "
    "`neva export hf-llava --all-checkpoints runs/NAME --output OUT`"
)


def arch_record(arch: ClipVisionArch) -> dict[str, Any]:
    """The ``vision.arch`` config entry of ``arch`` (``model_type`` clip or siglip, then every field)."""
    return {"model_type": siglip.vision_model_type(arch), **dataclasses.asdict(arch)}


def arch_from_record(record: Mapping[str, Any], where: str) -> ClipVisionArch:
    """The architecture a ``vision.arch`` config entry describes (the inverse of :func:`arch_record`)."""
    record = dict(record)
    kind = record.pop("model_type", None)
    classes = {"clip": ClipVisionArch, "siglip": siglip.SiglipVisionArch}
    if kind not in classes:
        raise NevaError(f"{where}: vision.arch.model_type is {kind!r}; expected one of {', '.join(classes)}")
    fields = {f.name for f in dataclasses.fields(classes[kind])}
    unknown, missing = sorted(set(record) - fields), sorted(fields - set(record))
    if unknown or missing:
        raise NevaError(f"{where}: vision.arch does not describe a {kind} tower (unknown keys {unknown}, missing "
                        f"{missing}); the file was not written by neva train")  # fmt: skip
    return classes[kind](**record)


def select_layer(cfg: Mapping[str, Any]) -> int:
    """``mm_cfg.vision_encoder.vision_select_layer`` of a NeVA config (default -2)."""
    encoder = (cfg.get("mm_cfg") or {}).get("vision_encoder") or {}
    value = encoder.get("vision_select_layer")
    return -2 if value is None else int(value)


def tower_trained(cfg: Mapping[str, Any]) -> bool:
    """True when the config says the vision tower was trained (``mm_cfg.vision_encoder.freeze: false``)."""
    encoder = (cfg.get("mm_cfg") or {}).get("vision_encoder") or {}
    return encoder.get("freeze") is False


def stored_arch(cfg: Mapping[str, Any], where: str) -> ClipVisionArch | None:
    """The architecture of the tower a ``.nemo`` stores under ``model.vision_model.*``, or None when it has none."""
    vision = cfg.get("vision") or {}
    if not vision.get("stored"):
        return None
    if not isinstance(vision.get("arch"), Mapping):
        raise NevaError(f"{where}: vision.stored is true but vision.arch is missing; the file is damaged")
    return arch_from_record(vision["arch"], where)


def splits(arch: ClipVisionArch, select: int) -> dict[str, Split]:
    """Archive name (``model.vision_model.…``) → TP split kind of every stored tensor, from the family's table."""
    family = siglip if isinstance(arch, siglip.SiglipVisionArch) else clip
    return {PREFIX + name: split for name, split in family.mcore_splits(arch, select).items()}


def shapes(arch: ClipVisionArch, select: int) -> dict[str, tuple[int, ...]]:
    """Archive name (``model.vision_model.…``) → full (TP=1) shape of every stored tensor, from the family's table."""
    family = siglip if isinstance(arch, siglip.SiglipVisionArch) else clip
    return {PREFIX + name: shape for name, shape in family.mcore_shapes(arch, select).items()}


def stored_shapes(cfg: Mapping[str, Any], where: str) -> dict[str, tuple[int, ...]]:
    """The full shapes of the tower tensors a ``.nemo`` config says the archive holds (empty when none)."""
    arch = stored_arch(cfg, where)
    return {} if arch is None else shapes(arch, select_layer(cfg))


def stored_splits(cfg: Mapping[str, Any], where: str) -> dict[str, Split]:
    """The tower tensors a ``.nemo`` config says the archive holds, with their split kinds (empty when none)."""
    arch = stored_arch(cfg, where)
    return {} if arch is None else splits(arch, select_layer(cfg))


def holds_tower(names: Iterable[str]) -> bool:
    """True when archive tensor ``names`` include a vision tower (ours or NeMo-1's)."""
    return any(n.startswith((PREFIX, NEMO1_PREFIX)) for n in names if n)


def check_trained_tower(cfg: Mapping[str, Any], held: bool, where: str, *, bypass: str | None) -> None:
    """Refuse a file whose config says the tower trained but which holds no tower (``held``: in a form the caller
    reads), so the original tower would be used. ``bypass`` names the caller's way to give the trained tower, or is
    None when the caller was given one (then nothing is refused)."""
    if held or bypass is None or not tower_trained(cfg):
        return
    original = ((cfg.get("mm_cfg") or {}).get("vision_encoder") or {}).get("from_pretrained")
    raise NevaError(f"{where} was trained with an unfrozen vision tower (mm_cfg.vision_encoder.freeze: false) but "
                    "stores no vision tower weights (model.vision_model.*; files written before neva train stored "
                    f"trained towers lack them), so the original, untrained tower {original} would be used; "
                    f"{FROM_CHECKPOINTS}, or {bypass}")  # fmt: skip


@dataclass
class StoredTower:
    """A vision tower read from a ``.nemo``: architecture, the select layer it was stored for, full tensors."""

    arch: ClipVisionArch
    select_layer: int  # the stored layers are those kept for it
    tensors: dict[str, torch.Tensor]  # full (TP=1) CLIPViTModel tensors, names without ``model.vision_model.``
    where: str

    def for_layer(self, select: int) -> dict[str, torch.Tensor]:
        """The tensors of a model built for ``select`` (a select layer up to the stored one)."""
        wanted = {name.removeprefix(PREFIX) for name in splits(self.arch, select)}
        missing = sorted(wanted - set(self.tensors))
        if missing:
            raise NevaError(f"{self.where} stores the vision tower's first {self.arch.kept_layers(self.select_layer)} "
                            f"layers (vision_select_layer {self.select_layer}); vision_select_layer {select} needs "
                            f"{self.arch.kept_layers(select)} (missing {', '.join(missing[:5])})")  # fmt: skip
        return {name: self.tensors[name] for name in sorted(wanted)}


def read_tower(archive: NemoArchive) -> StoredTower | None:
    """The tower stored in ``archive`` under ``model.vision_model.*`` (full tensors, TP merged), or None."""
    from neva_tools.checkpoint.nemo_tensors import NemoTensors, load_arch, model_config

    where = str(archive.path)
    cfg = model_config(archive)
    arch = stored_arch(cfg, where)
    if arch is None:
        return None
    _, llm = load_arch(archive)
    tensors = NemoTensors(archive, llm)  # checks every stored tower tensor against the config, both ways
    full = {name.removeprefix(PREFIX): tensors.full(name) for name in tensors.names() if name.startswith(PREFIX)}
    return StoredTower(arch, select_layer(cfg), full, where)
