"""The inverse CLIP and projector tables (used by ``neva export hf-llava``): exact round trips."""

from __future__ import annotations

import pytest
import torch

from neva_tools.errors import NevaError
from neva_tools.mappings.clip import (
    ClipVisionArch,
    hf_clip_state_to_mcore,
    mcore_state_to_hf_clip,
    open_clip_state_to_mcore,
)
from neva_tools.mappings.projector import mcore_to_llava_hf, nemo_to_llava_hf

ARCH = ClipVisionArch(image_size=32, patch_size=8, hidden_size=64, num_layers=3, num_heads=4, ffn_hidden_size=128,
                      activation="gelu_tanh")  # fmt: skip


def _hf_state() -> dict[str, torch.Tensor]:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(**ARCH.to_hf_config()))
    return {k.removeprefix("vision_model."): v for k, v in model.state_dict().items()
            if not k.endswith(("position_ids", "post_layernorm.weight", "post_layernorm.bias"))}  # fmt: skip


def test_hf_config_round_trip() -> None:
    from transformers import CLIPVisionConfig

    assert ClipVisionArch.from_hf_config(ARCH.to_hf_config()) == ARCH
    assert ClipVisionArch.from_hf_config(CLIPVisionConfig(**ARCH.to_hf_config()).to_dict()) == ARCH
    for activation in ("quick_gelu", "gelu"):
        arch = ARCH.replace(activation=activation)
        assert ClipVisionArch.from_hf_config(arch.to_hf_config()) == arch


def test_mcore_to_hf_is_the_inverse_for_all_and_kept_layers() -> None:
    hf = _hf_state()
    back = mcore_state_to_hf_clip(hf_clip_state_to_mcore(hf, ARCH, select_layer=-1), ARCH)
    assert back.keys() == hf.keys() and all(torch.equal(back[k], hf[k]) for k in hf)
    kept = mcore_state_to_hf_clip(hf_clip_state_to_mcore(hf, ARCH, select_layer=-2), ARCH, select_layer=-2)
    assert not any(k.startswith("encoder.layers.2.") for k in kept)
    assert all(torch.equal(kept[k], hf[k]) for k in kept) and len(kept) == len(hf) - 16


def test_open_clip_to_hf_matches_hf_features() -> None:
    """open_clip → megatron-core → HF gives a HF CLIP tower with open_clip's features (per-head QKV order)."""
    from open_clip.transformer import VisionTransformer
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(1)
    visual = VisionTransformer(image_size=32, patch_size=8, width=64, layers=3, heads=4, mlp_ratio=2.0,
                               output_dim=16, act_layer=torch.nn.GELU).eval()  # fmt: skip
    arch = ClipVisionArch.from_open_clip(visual)
    hf = mcore_state_to_hf_clip(open_clip_state_to_mcore(visual.state_dict(), arch, select_layer=-1), arch)
    model = CLIPVisionModel(CLIPVisionConfig(**arch.to_hf_config())).eval()
    missing, unexpected = model.load_state_dict(hf, strict=False)  # transformers 5: no vision_model. prefix
    assert sorted(missing) == ["post_layernorm.bias", "post_layernorm.weight"] and not unexpected
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        theirs = model(images, output_hidden_states=True).hidden_states[-1]
        x = visual.conv1(images).flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.expand(2, 1, -1), x], dim=1) + visual.positional_embedding
        ours = visual.transformer(visual.ln_pre(x))
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_wrong_names_and_shapes() -> None:
    full = hf_clip_state_to_mcore(_hf_state(), ARCH, select_layer=-1)
    with pytest.raises(NevaError, match=r"missing \['decoder.layers.2.mlp.linear_fc1.bias'\]"):
        mcore_state_to_hf_clip({k: v for k, v in full.items() if k != "decoder.layers.2.mlp.linear_fc1.bias"}, ARCH)
    with pytest.raises(NevaError, match=r"ln_pre\.weight has shape"):
        mcore_state_to_hf_clip({**full, "ln_pre.weight": torch.zeros(3)}, ARCH)


def test_projector_names() -> None:
    assert nemo_to_llava_hf("mlp2x_gelu") == {
        f"model.embedding.word_embeddings.adapter_layer.mm_projector_adapter.mm_projector.{i}.{p}":
            f"multi_modal_projector.linear_{1 + i // 2}.{p}" for i in (0, 2) for p in ("weight", "bias")
    }  # fmt: skip
    assert mcore_to_llava_hf("mlp2x_gelu")["vision_projection.encoder.linear_fc2.weight"] == (
        "multi_modal_projector.linear_2.weight"
    )
