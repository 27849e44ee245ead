"""The vision tower of an exported model, as Hugging Face ``CLIPVisionModel`` or ``SiglipVisionModel`` tensors and
config (the family's table: ``neva_tools.mappings.clip`` or ``.siglip``, picked by the architecture's type).

Where it comes from, first match wins:

1. ``--vision PATH`` (a Hugging Face CLIP/SigLIP directory, an open_clip directory or ``name:checkpoint``);
2. the tower stored in the ``.nemo`` itself (``neva import`` writes it, with its ``vision.hf_config``);
3. the training config: ``mm_cfg.vision_encoder.from_pretrained`` (or ``vision.source``).

Every layer is exported, also those after ``vision_select_layer`` and ``post_layernorm`` (open_clip's
``ln_post``, timm's ``norm``; an identity norm where the source has none), so the directory is a complete tower;
LLaVA reads ``hidden_states[vision_feature_layer]``, so those tensors do not change the outputs. Trained vision
tensors found next to the LLM (NeMo-1's ``vision_encoder`` entries, the ``model.vision_model`` layers ``neva train``
stores in its ``.nemo``, or a training checkpoint's ``vision_model``) replace the source's. A ``.nemo`` storing its
trained layers exports without the source too: those layers alone (:func:`stored_mcore_tower`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from neva_tools.checkpoint.nemo_vision import StoredTower
from neva_tools.errors import NevaError
from neva_tools.mappings import clip, llava_hf, siglip
from neva_tools.mappings.clip import HF_PREFIX, OPEN_CLIP_POST_NORM, ClipVisionArch

logger = logging.getLogger(__name__)

#: Where NeMo-1 NeVA keeps a (trained) HF CLIP tower inside the LLM state dict.
NEMO_VISION_PREFIX = "model.embedding.word_embeddings.vision_encoder."
#: HF ``CLIPModel`` / ``SiglipModel`` tensors that are not part of the vision tower (SigLIP's pooling ``head`` is
#: not built by the exported ``SiglipVisionModel``: ``vision_use_head`` false).
_NOT_VISION = ("text_model.", "visual_projection.", "text_projection.", "logit_scale", "logit_bias",
               "embeddings.position_ids")  # fmt: skip
_NOT_SIGLIP_VISION = ("head.",)
#: timm's final norm (open_clip SigLIP ``trunk.norm``) → HF ``post_layernorm`` (unused by layer features).
_TIMM_POST_NORM = {"norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}


def hf_to_mcore(state: Mapping[str, torch.Tensor], arch: ClipVisionArch, select_layer: int) -> dict[str, torch.Tensor]:
    """Full ``CLIPViTModel`` tensors from HF tower tensors, by the family's table (every name and shape checked)."""
    if isinstance(arch, siglip.SiglipVisionArch):
        return siglip.hf_siglip_state_to_mcore(state, arch, select_layer=select_layer)
    return clip.hf_clip_state_to_mcore(state, arch, select_layer=select_layer)


def mcore_to_hf(state: Mapping[str, torch.Tensor], arch: ClipVisionArch, select_layer: int) -> dict[str, torch.Tensor]:
    """HF tower tensors (names without ``vision_model.``) from full ``CLIPViTModel`` tensors, by the family's table."""
    if isinstance(arch, siglip.SiglipVisionArch):
        return siglip.mcore_state_to_hf_siglip(state, arch, select_layer=select_layer)
    return clip.mcore_state_to_hf_clip(state, arch, select_layer=select_layer)


@dataclass
class VisionTower:
    """A complete HF CLIP or SigLIP vision tower: tensors (names without ``vision_model.``), architecture
    (a ``SiglipVisionArch`` for SigLIP), provenance."""

    state: dict[str, torch.Tensor]
    arch: ClipVisionArch
    source: str
    #: HF ``vision_feature_layer`` to export when it is not the model's ``vision_select_layer`` (a tower of the
    #: stored layers only, see :func:`stored_mcore_tower`)
    feature_layer: int | None = None

    def override(self, trained: Mapping[str, torch.Tensor], where: str) -> None:
        """Replace tensors by trained ones of the same names and shapes; any other name raises."""
        unknown = sorted(k for k in trained if k not in self.state)
        if unknown:
            raise NevaError(f"{where}: vision tensors {', '.join(unknown[:10])} are not in the vision tower from "
                            f"{self.source}")  # fmt: skip
        for name, tensor in trained.items():
            if tensor.shape != self.state[name].shape:
                raise NevaError(f"{where}: vision tensor {name} has shape {tuple(tensor.shape)}, the vision tower "
                                f"from {self.source} has {tuple(self.state[name].shape)}")  # fmt: skip
            self.state[name] = tensor


def split_source(value: str) -> tuple[str, str | None]:
    """``from_pretrained`` → (source, pretrained): a path as is, ``name:checkpoint`` split (as ``neva train``)."""
    if Path(value).exists() or ":" not in value:
        return value, None
    name, checkpoint = value.split(":", 1)
    return name, checkpoint


def read_hf_tower(path: Path) -> VisionTower:
    """A HF ``CLIPVisionModel`` / ``CLIPModel`` / ``SiglipVisionModel`` / ``SiglipModel`` directory's vision tower,
    or the tower inside a LLaVA / LLaVA-NeXT / LLaVA-OneVision directory (``neva import``'s ``vision.source``);
    tensors read, no model code run."""
    import json

    import transformers

    from neva_tools.checkpoint.hf_reader import HFCheckpoint

    where = str(path / "config.json")
    cfg = json.loads((path / "config.json").read_text())
    fmt = llava_hf.FORMATS.get(str(cfg.get("model_type")))
    if fmt is not None:  # the class's config completes llava-hf's sparse vision_config
        cfg = getattr(transformers, fmt.config_class).from_dict(cfg).vision_config.to_dict()
    arch = siglip.hf_vision_arch(cfg, where)
    skip = _NOT_VISION + (_NOT_SIGLIP_VISION if isinstance(arch, siglip.SiglipVisionArch) else ())
    with HFCheckpoint(path) as ckpt:
        if fmt is None:
            names = {n.removeprefix(HF_PREFIX): n for n in ckpt.names()}
        else:
            names = {found[1]: n for n in ckpt.names() if (found := llava_hf.locate(n)) and found[0] == "vision"}
        state = {name: ckpt.get(n) for name, n in names.items() if not name.startswith(skip)}
    hf_to_mcore(state, arch, -1)  # checks every name and shape
    return VisionTower(state, arch, str(path))


def _identity_post_norm(state: dict[str, torch.Tensor], hidden: int, dtype: torch.dtype) -> None:
    """An identity ``post_layernorm`` where the source has none (unused by layer features; HF builds one)."""
    state.setdefault("post_layernorm.weight", torch.ones(hidden, dtype=dtype))
    state.setdefault("post_layernorm.bias", torch.zeros(hidden, dtype=dtype))


def read_tower(source: str, pretrained: str | None = None) -> VisionTower:
    """The HF tensors of any CLIP or SigLIP source ``neva train`` accepts (HF or open_clip; converted as needed)."""
    from neva_tools.model.vision import read_clip_vision, vision_state_to_mcore

    path = Path(source)
    if path.is_dir() and (path / "config.json").is_file():
        return read_hf_tower(path)
    state, arch, kind = read_clip_vision(source, pretrained=pretrained)  # open_clip (HF directories: above)
    hf = mcore_to_hf(vision_state_to_mcore(state, arch, kind, select_layer=-1), arch, -1)
    post_norm = _TIMM_POST_NORM if kind == "open_clip_siglip" else OPEN_CLIP_POST_NORM
    hf.update({new: state[old] for old, new in post_norm.items() if old in state})
    _identity_post_norm(hf, arch.hidden_size, next(iter(hf.values())).dtype)
    return VisionTower(hf, arch, f"{source} (open_clip)")


def stored_tower(cfg: Mapping[str, Any], stored: Mapping[str, torch.Tensor], where: str) -> VisionTower | None:
    """The tower stored in a ``.nemo`` (NeMo-1 names) when its config is known, else None."""
    hf_config = (cfg.get("vision") or {}).get("hf_config")
    if not stored or hf_config is None:
        return None
    arch = siglip.hf_vision_arch(hf_config, source=f"{where}: vision.hf_config")
    state = {k.removeprefix(NEMO_VISION_PREFIX).removeprefix(HF_PREFIX): v for k, v in stored.items()}
    hf_to_mcore(state, arch, -1)
    return VisionTower(state, arch, where)


def resolve_tower(cfg: Mapping[str, Any], stored: Mapping[str, torch.Tensor], where: str,
                  vision: str | None = None) -> VisionTower:  # fmt: skip
    """The vision tower for the model described by ``cfg`` (see the module docstring for the order)."""
    tower = None
    if vision is not None:
        source, pretrained = split_source(str(vision))
        if not Path(source).exists() and pretrained is None:
            raise NevaError(f"--vision {vision} does not exist; pass a CLIP/SigLIP directory or name:checkpoint")
        tower = read_tower(source, pretrained)
    elif (tower := stored_tower(cfg, stored, where)) is not None:
        stored = {}
    else:
        encoder = (cfg.get("mm_cfg") or {}).get("vision_encoder") or {}
        value = encoder.get("from_pretrained") or (cfg.get("vision") or {}).get("source")
        if not value:
            raise NevaError(f"{where} names no vision encoder (mm_cfg.vision_encoder.from_pretrained); pass "
                            "--vision CLIP_DIR")  # fmt: skip
        source, pretrained = split_source(str(value))
        if not Path(source).exists() and pretrained is None:
            raise NevaError(f"{where}: the vision encoder {value} (mm_cfg.vision_encoder.from_pretrained) does not "
                            "exist here; pass --vision with the CLIP used for training")  # fmt: skip
        tower = read_tower(source, pretrained)
    if stored:
        tower.override({k.removeprefix(NEMO_VISION_PREFIX).removeprefix(HF_PREFIX): v for k, v in stored.items()},
                       where)  # fmt: skip
    expected = cfg.get("vision") or {}
    for key, value in (("image_size", tower.arch.image_size), ("patch_size", tower.arch.patch_size)):
        if key in expected and int(expected[key]) != value:
            raise NevaError(f"{where} was trained with vision {key} {expected[key]}, but the vision tower from "
                            f"{tower.source} has {value}; pass --vision with the tower used for training")  # fmt: skip
    logger.info("vision tower: %s (%d layers, %dpx, patch %d)", tower.source, tower.arch.num_layers,
                tower.arch.image_size, tower.arch.patch_size)  # fmt: skip
    return tower


def _source_available(cfg: Mapping[str, Any]) -> bool:
    """Whether the tower named by ``mm_cfg.vision_encoder.from_pretrained`` (or ``vision.source``) is here."""
    encoder = (cfg.get("mm_cfg") or {}).get("vision_encoder") or {}
    value = encoder.get("from_pretrained") or (cfg.get("vision") or {}).get("source")
    if not value:
        return False
    source, pretrained = split_source(str(value))
    return Path(source).exists() or (pretrained is not None and Path(pretrained).is_file())


def stored_mcore_tower(
    cfg: Mapping[str, Any], stored: StoredTower, where: str, vision: str | None = None
) -> VisionTower:
    """The trained tower ``neva train`` stored in a ``.nemo`` (``neva_tools.checkpoint.nemo_vision``: the layers up
    to the select layer) as HF tensors, laid over the complete tower of ``vision`` or the training config (the
    later layers and ``post_layernorm``, which LLaVA's features do not use). Where that tower is not at hand, the
    stored layers alone are exported with an identity ``post_layernorm`` and ``feature_layer`` set to the last of them:
    the same features."""
    trained = mcore_to_hf(stored.tensors, stored.arch, stored.select_layer)
    if vision is not None or _source_available(cfg):
        tower = resolve_tower(cfg, {}, where, vision)
        if tower.arch != stored.arch:
            raise NevaError(f"{where} stores a trained vision tower {stored.arch}, but the vision tower from "
                            f"{tower.source} is {tower.arch}; pass --vision with the CLIP used for "
                            "training")  # fmt: skip
        tower.override(trained, where)
        tower.source = f"{where} (trained layers) over {tower.source}"
        return tower
    kept = stored.arch.kept_layers(stored.select_layer)
    _identity_post_norm(trained, stored.arch.hidden_size, trained["embeddings.patch_embedding.weight"].dtype)
    logger.info("the tower %s was trained from is not here: exporting the %d trained layers alone", where, kept)
    return VisionTower(trained, stored.arch.replace(num_layers=kept), f"{where} (trained layers)", feature_layer=kept)
