"""The vision encoder's architecture from its configuration alone (no weights read), for config validation.

``vision_encoder.from_pretrained`` takes the forms ``neva train`` accepts (see ``neva_tools.model.vision.
read_clip_vision``): a Hugging Face CLIP or SigLIP directory (``config.json``), an open_clip directory
(``open_clip_config.json``), or ``NAME:CHECKPOINT`` with ``NAME`` an open_clip model. An open_clip model's
config ships inside the open_clip package, so its architecture is known without any file or network. open_clip
towers are built on the meta device by open_clip itself (timm trunks without pretrained weights) and read by
``neva_tools.mappings.siglip.open_clip_vision_arch``, as training reads them, so the validator accepts and
rejects what training does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from neva_tools.errors import NevaError
from neva_tools.mappings.clip import ClipVisionArch
from neva_tools.mappings.siglip import hf_vision_arch, open_clip_vision_arch


def open_clip_name(source: str) -> str | None:
    """The open_clip model name of ``NAME`` or ``NAME:CHECKPOINT`` when it names a model open_clip ships, else None."""
    import open_clip

    name = source.split(":", 1)[0]
    return name if name in open_clip.list_models() else None  # the package's own configs: never a hub lookup


def arch_from_open_clip_config(model_cfg: dict[str, Any], source: str) -> ClipVisionArch:
    """The architecture of an open_clip ``model_cfg`` (``embed_dim``, ``vision_cfg``, ``quick_gelu``)."""
    import torch
    from open_clip.model import _build_vision_tower

    vision_cfg = {**(model_cfg.get("vision_cfg") or {}), "timm_model_pretrained": False}  # never a download
    try:
        with torch.device("meta"):  # shapes only: nothing is allocated or initialised
            visual = _build_vision_tower(int(model_cfg.get("embed_dim", 512)), vision_cfg,
                                         bool(model_cfg.get("quick_gelu", False)))  # fmt: skip
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        raise NevaError(f"{source}: open_clip cannot build the vision tower of this config: {exc}") from None
    return open_clip_vision_arch(visual)


def vision_arch(source: str) -> ClipVisionArch | None:
    """The architecture of ``vision_encoder.from_pretrained``, or None when it is neither local nor an open_clip name.

    Raises ``NevaError`` for a local directory without a CLIP config or with an unsupported architecture.
    """
    path = Path(source)
    if path.is_dir():
        if (path / "config.json").is_file():
            config = path / "config.json"
            return hf_vision_arch(json.loads(config.read_text()), source=str(config))
        if (path / "open_clip_config.json").is_file():
            config = path / "open_clip_config.json"
            return arch_from_open_clip_config(json.loads(config.read_text()).get("model_cfg") or {}, str(config))
        raise NevaError(f"{path} has neither config.json (Hugging Face CLIP) nor open_clip_config.json (open_clip)")
    if path.exists():
        return None
    name = open_clip_name(source)
    if name is None:
        return None
    import open_clip

    return arch_from_open_clip_config(open_clip.get_model_config(name), f"open_clip model {name}")
