"""The CLIP vision tower of an exported model, as Hugging Face ``CLIPVisionModel`` tensors and config.

Where it comes from, first match wins:

1. ``--vision PATH`` (a Hugging Face CLIP directory, an open_clip directory or ``name:checkpoint``);
2. the tower stored in the ``.nemo`` itself (``neva import`` writes it, with its ``vision.hf_config``);
3. the training config: ``mm_cfg.vision_encoder.from_pretrained`` (or ``vision.source``).

Every layer is exported, also those after ``vision_select_layer`` and ``post_layernorm`` (open_clip's
``ln_post``), so the directory is a complete CLIP tower; LLaVA reads ``hidden_states[vision_feature_layer]``, so
those tensors do not change the outputs. Trained vision tensors found next to the LLM (NeMo-1's
``vision_encoder`` entries, or a training checkpoint's ``vision_model``) replace the source's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from neva_tools.errors import NevaError
from neva_tools.mappings.clip import (
    HF_PREFIX,
    OPEN_CLIP_POST_NORM,
    ClipVisionArch,
    hf_clip_state_to_mcore,
    mcore_state_to_hf_clip,
    open_clip_state_to_mcore,
)

logger = logging.getLogger(__name__)

#: Where NeMo-1 NeVA keeps a (trained) HF CLIP tower inside the LLM state dict.
NEMO_VISION_PREFIX = "model.embedding.word_embeddings.vision_encoder."
#: HF ``CLIPModel`` tensors that are not part of the vision tower.
_NOT_VISION = ("text_model.", "visual_projection.", "text_projection.", "logit_scale", "embeddings.position_ids")


@dataclass
class VisionTower:
    """A complete HF CLIP vision tower: tensors (names without ``vision_model.``), architecture, provenance."""

    state: dict[str, torch.Tensor]
    arch: ClipVisionArch
    source: str

    def override(self, trained: Mapping[str, torch.Tensor], where: str) -> None:
        """Replace tensors by trained ones of the same names and shapes; any other name raises."""
        unknown = sorted(k for k in trained if k not in self.state)
        if unknown:
            raise NevaError(f"{where}: vision tensors {', '.join(unknown[:10])} are not in the CLIP tower from "
                            f"{self.source}")  # fmt: skip
        for name, tensor in trained.items():
            if tensor.shape != self.state[name].shape:
                raise NevaError(f"{where}: vision tensor {name} has shape {tuple(tensor.shape)}, the CLIP tower "
                                f"from {self.source} has {tuple(self.state[name].shape)}")  # fmt: skip
            self.state[name] = tensor


_SIGLIP_UNSUPPORTED = (
    "{source} is a SigLIP vision tower; export to Hugging Face LLaVA supports CLIP towers only "
    "(LlavaForConditionalGeneration with a SigLIP tower is not written yet)"
)


def split_source(value: str) -> tuple[str, str | None]:
    """``from_pretrained`` → (source, pretrained): a path as is, ``name:checkpoint`` split (as ``neva train``)."""
    if Path(value).exists() or ":" not in value:
        return value, None
    name, checkpoint = value.split(":", 1)
    return name, checkpoint


def read_hf_tower(path: Path) -> VisionTower:
    """A HF ``CLIPVisionModel`` / ``CLIPModel`` directory's vision tower (tensors read, no model code run)."""
    import json

    from neva_tools.checkpoint.hf_reader import HFCheckpoint

    arch = ClipVisionArch.from_hf_config(json.loads((path / "config.json").read_text()), str(path / "config.json"))
    with HFCheckpoint(path) as ckpt:
        state = {n.removeprefix(HF_PREFIX): ckpt.get(n) for n in ckpt.names()
                 if not n.removeprefix(HF_PREFIX).startswith(_NOT_VISION)}  # fmt: skip
    hf_clip_state_to_mcore(state, arch, select_layer=-1)  # checks every name and shape
    return VisionTower(state, arch, str(path))


def read_tower(source: str, pretrained: str | None = None) -> VisionTower:
    """The HF tensors of any CLIP source ``neva train`` accepts (HF or open_clip; converted as needed)."""
    from neva_tools.model.vision import read_clip_vision

    path = Path(source)
    if path.is_dir() and (path / "config.json").is_file():
        import json

        from neva_tools.mappings.siglip import is_siglip_hf_config

        if is_siglip_hf_config(json.loads((path / "config.json").read_text())):
            raise NevaError(_SIGLIP_UNSUPPORTED.format(source=source))
        return read_hf_tower(path)
    state, arch, kind = read_clip_vision(source, pretrained=pretrained)  # open_clip (HF directories: above)
    if "siglip" in kind:
        raise NevaError(_SIGLIP_UNSUPPORTED.format(source=source))
    hf = mcore_state_to_hf_clip(open_clip_state_to_mcore(state, arch, select_layer=-1), arch)
    hf.update({new: state[old] for old, new in OPEN_CLIP_POST_NORM.items() if old in state})
    return VisionTower(hf, arch, f"{source} (open_clip)")


def stored_tower(cfg: Mapping[str, Any], stored: Mapping[str, torch.Tensor], where: str) -> VisionTower | None:
    """The tower stored in a ``.nemo`` (NeMo-1 names) when its config is known, else None."""
    hf_config = (cfg.get("vision") or {}).get("hf_config")
    if not stored or hf_config is None:
        return None
    arch = ClipVisionArch.from_hf_config(hf_config, source=f"{where}: vision.hf_config")
    state = {k.removeprefix(NEMO_VISION_PREFIX).removeprefix(HF_PREFIX): v for k, v in stored.items()}
    hf_clip_state_to_mcore(state, arch, select_layer=-1)
    return VisionTower(state, arch, where)


def resolve_tower(cfg: Mapping[str, Any], stored: Mapping[str, torch.Tensor], where: str,
                  vision: str | None = None) -> VisionTower:  # fmt: skip
    """The vision tower for the model described by ``cfg`` (see the module docstring for the order)."""
    tower = None
    if vision is not None:
        source, pretrained = split_source(str(vision))
        if not Path(source).exists() and pretrained is None:
            raise NevaError(f"--vision {vision} does not exist; pass a CLIP directory or name:checkpoint")
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
            raise NevaError(f"{where} was trained with vision {key} {expected[key]}, but the CLIP tower from "
                            f"{tower.source} has {value}; pass --vision with the CLIP used for training")  # fmt: skip
    logger.info("vision tower: %s (%d layers, %dpx, patch %d)", tower.source, tower.arch.num_layers,
                tower.arch.image_size, tower.arch.patch_size)  # fmt: skip
    return tower
