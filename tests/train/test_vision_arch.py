"""The vision architecture read from configs alone equals the one read from a built model (what training uses)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from neva_tools.errors import NevaError
from neva_tools.mappings.clip import ClipVisionArch
from neva_tools.mappings.siglip import SiglipVisionArch
from neva_tools.train.vision_arch import arch_from_open_clip_config, open_clip_name, vision_arch


def test_open_clip_directory_matches_the_built_model(tmp_path: Path) -> None:
    import open_clip

    from neva_tools.demo import CLIP_CFG, build_clip

    clip = build_clip(tmp_path / "clip", image_size=48)
    model_cfg = json.loads((clip / "open_clip_config.json").read_text())["model_cfg"]
    built = ClipVisionArch.from_open_clip(open_clip.model.CLIP(**model_cfg).visual)
    assert vision_arch(str(clip)) == built
    assert built.image_size == 48 and built.num_heads == CLIP_CFG["vision_cfg"]["width"] // 16
    gelu = {**CLIP_CFG, "quick_gelu": False}
    assert arch_from_open_clip_config(gelu, "cfg").activation == "gelu"


def test_open_clip_names_resolve_from_the_package_without_files() -> None:
    """OpenAI's ViT-L/14-336 (LLaVA-1.5's encoder): 24 layers of width 1024, 16 heads, 336 px in 14-px patches."""
    arch = vision_arch("ViT-L-14-336-quickgelu:/nowhere/ckpt.pt")
    assert arch == ClipVisionArch(image_size=336, patch_size=14, hidden_size=1024, num_layers=24, num_heads=16,
                                  ffn_hidden_size=4096, activation="quick_gelu")  # fmt: skip
    assert arch.num_patches == 576 and vision_arch("ViT-L-14").num_patches == 256
    siglip = vision_arch("ViT-B-16-SigLIP:/nowhere/ckpt.bin")  # a timm trunk, built without pretrained weights
    assert isinstance(siglip, SiglipVisionArch)
    assert (siglip.num_heads, siglip.num_layers, siglip.num_patches) == (12, 12, 196)
    assert open_clip_name("hf-hub:timm/vit_large_patch14_clip_336.openai") is None  # never a hub lookup
    assert vision_arch("openai/clip-vit-large-patch14-336") is None  # neither local nor an open_clip name


def test_hf_config_and_unsupported_sources(tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "clip", "vision_config": {"image_size": 336,
                                                "patch_size": 14, "hidden_size": 1024, "num_attention_heads": 16,
                                                "num_hidden_layers": 24, "intermediate_size": 4096}}))  # fmt: skip
    assert vision_arch(str(hf)) == vision_arch("ViT-L-14-336-quickgelu")
    with pytest.raises(NevaError, match=r"has neither config\.json"):
        vision_arch(str(tmp_path))
    with pytest.raises(NevaError, match="open_clip cannot build the vision tower"):
        arch_from_open_clip_config({"vision_cfg": {"timm_model_name": "no_such_timm_model"}}, "cfg")
    with pytest.raises(NevaError, match="not a ViT"):
        vision_arch("EVA02-B-16")
    with pytest.raises(NevaError, match="LayerScale"):
        arch_from_open_clip_config({"vision_cfg": {"ls_init_value": 1e-5, "width": 64, "head_width": 16}}, "cfg")
    assert not torch.empty(0).is_meta  # building on the meta device leaves the default device alone
