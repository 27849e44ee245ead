"""Tiny SigLIP towers for the tests: HF ``SiglipVisionModel``/``SiglipModel`` and an open_clip (timm) tower.

The tiny towers take 30 px images in 7 px patches: 4 x 4 patches covering 28 px, the remainder dropped by the
"valid" patch convolution as in SigLIP so400m/14 at 384 px (27 x 27 = 729 patches covering 378 px). Importing
this module registers the timm model ``neva_test_tiny_siglip``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from timm.models import build_model_with_cfg, register_model
from timm.models.vision_transformer import VisionTransformer

from neva_tools.mappings.siglip import SiglipVisionArch

TOL = 1e-4
IMAGE, PATCH = 30, 7
HF_CFG = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
          "image_size": IMAGE, "patch_size": PATCH}  # fmt: skip
ARCH = SiglipVisionArch(image_size=IMAGE, patch_size=PATCH, hidden_size=64, num_layers=3, num_heads=4,
                        ffn_hidden_size=128)  # fmt: skip
TIMM_MODEL = "neva_test_tiny_siglip"
TIMM_ARGS = {"img_size": IMAGE, "patch_size": PATCH, "embed_dim": 64, "depth": 3, "num_heads": 4, "mlp_ratio": 2.0,
             "class_token": False, "global_pool": "map"}  # fmt: skip
OPEN_CLIP_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": IMAGE, "timm_model_name": TIMM_MODEL, "timm_model_pretrained": False,
                   "timm_pool": "map", "timm_proj": "none"},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}  # fmt: skip


@register_model
def neva_test_tiny_siglip(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """A 3-layer timm ViT shaped like timm's SigLIP models (no class token, MAP head, exact GELU)."""
    return build_model_with_cfg(VisionTransformer, TIMM_MODEL, pretrained, **{**TIMM_ARGS, **kwargs})


def perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Random values everywhere (layer norms, biases too), so a swapped or misplaced tensor cannot go unnoticed."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def hf_vision() -> torch.nn.Module:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    return perturb(SiglipVisionModel(SiglipVisionConfig(**HF_CFG)))


def hf_reference(model: torch.nn.Module, images: torch.Tensor, select_layer: int) -> torch.Tensor:
    """``hidden_states[select_layer]`` (no ``post_layernorm``; SigLIP has no class token to drop)."""
    with torch.no_grad():
        return model(pixel_values=images, output_hidden_states=True).hidden_states[select_layer]


def build_checkpoints(root: Path) -> dict[str, Any]:
    """Tiny random HF SiglipVisionModel and SiglipModel directories and an open_clip (timm) SigLIP directory."""
    import open_clip
    from transformers import SiglipConfig, SiglipModel

    hf = hf_vision()
    hf.save_pretrained(root / "hf_vision")
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 64, "max_position_embeddings": 8, "bos_token_id": 0, "eos_token_id": 1,
            "pad_token_id": 1}  # fmt: skip
    full = SiglipModel(SiglipConfig(vision_config=HF_CFG, text_config=text))
    full.vision_model.load_state_dict(hf.state_dict())
    full.save_pretrained(root / "hf_siglip")

    torch.manual_seed(1)
    oc = perturb(open_clip.model.CLIP(**OPEN_CLIP_CFG))
    oc_dir = root / "open_clip"
    oc_dir.mkdir()
    (oc_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": OPEN_CLIP_CFG}))
    torch.save(oc.state_dict(), oc_dir / "open_clip_pytorch_model.bin")
    out: list[torch.Tensor] = []
    hook = oc.visual.trunk.blocks[-2].register_forward_hook(lambda m, i, o: out.append(o))
    images = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        oc.visual(images)
    hook.remove()
    refs = {f"hf_{layer}": hf_reference(hf, images, layer) for layer in (-2, -1, 1)}
    return {"hf_vision": root / "hf_vision", "hf_siglip": root / "hf_siglip", "open_clip": oc_dir,
            "images": images, "open_clip_ref": out[0], **refs}  # fmt: skip


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape == (2, 16, 64)
    return (a - b).abs().max().item()
