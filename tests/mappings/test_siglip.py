"""SigLIP vision towers (HF and open_clip/timm) → megatron-core's ``CLIPViTModel`` (siglip): architecture, tables,
conversion both ways, TP split/merge and errors. Parity of the built model: ``tests/model/test_siglip_model.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from siglip_tiny import (
    ARCH,
    HF_CFG,
    IMAGE,
    TOL,
    build_checkpoints,
    hf_vision,
    max_diff,
    neva_test_tiny_siglip,
    perturb,
)

from neva_tools.checkpoint.tp import merge, shard
from neva_tools.errors import NevaError
from neva_tools.mappings import clip
from neva_tools.mappings.siglip import (
    HF_TABLE,
    TIMM_TABLE,
    SiglipVisionArch,
    hf_siglip_state_to_mcore,
    hf_vision_arch,
    mcore_shapes,
    mcore_splits,
    mcore_state_to_hf_siglip,
    timm_siglip_state_to_mcore,
    transformer_config,
    vision_model_type,
)
from neva_tools.mappings.transforms import unfuse_qkv


@pytest.fixture(scope="module")
def hf_state() -> dict[str, torch.Tensor]:
    return dict(hf_vision().state_dict())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return build_checkpoints(tmp_path_factory.mktemp("siglip"))


def test_references_tell_layers_apart(checkpoints: dict) -> None:
    """The parity checks below can fail: neighbouring layers' features differ by far more than the tolerance."""
    assert max_diff(checkpoints["hf_-2"], checkpoints["hf_-1"]) > 100 * TOL
    assert max_diff(checkpoints["hf_-2"], checkpoints["hf_1"]) > 100 * TOL


# ---------------------------------------------------------------------------------------------------------------
# Architecture
# ---------------------------------------------------------------------------------------------------------------


def test_arch_from_hf_configs(hf_state: dict[str, torch.Tensor]) -> None:
    from transformers import SiglipConfig, SiglipVisionConfig

    assert SiglipVisionArch.from_hf_config(SiglipVisionConfig(**HF_CFG).to_dict()) == ARCH
    assert SiglipVisionArch.from_hf_config({}) == SiglipVisionArch.from_hf_config(SiglipVisionConfig().to_dict())
    whole = SiglipConfig(vision_config=HF_CFG).to_dict()
    assert hf_vision_arch(whole) == ARCH and vision_model_type(hf_vision_arch(whole)) == "siglip"
    clip_arch = hf_vision_arch({"model_type": "clip_vision_model", "hidden_size": 64, "num_attention_heads": 4})
    assert type(clip_arch) is clip.ClipVisionArch and vision_model_type(clip_arch) == "clip"
    assert SiglipVisionArch.from_hf_config(ARCH.to_hf_config()) == ARCH
    with pytest.raises(NevaError, match="'llama' is not a SigLIP vision model"):
        SiglipVisionArch.from_hf_config({"model_type": "llama"})
    with pytest.raises(NevaError, match="'siglip2_vision_model' is not a CLIP or SigLIP vision model"):
        hf_vision_arch({"model_type": "siglip2_vision_model"})  # SigLIP 2 NaFlex: other embeddings
    with pytest.raises(NevaError, match="hidden_act 'relu'"):
        SiglipVisionArch.from_hf_config({"hidden_act": "relu"})
    with pytest.raises(NevaError, match=r"image_size \[30, 28\] is not square"):
        SiglipVisionArch.from_hf_config({"image_size": [30, 28]})


def test_so400m_at_384_gives_729_tokens() -> None:
    """google/siglip-so400m-patch14-384's vision_config: 27 x 27 patches; megatron-core builds 378 px."""
    vision = {"hidden_size": 1152, "image_size": 384, "intermediate_size": 4304, "model_type": "siglip_vision_model",
              "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14}  # fmt: skip
    arch = hf_vision_arch({"model_type": "siglip", "vision_config": vision})
    assert (arch.num_patches, arch.covered_size, arch.activation) == (729, 378, "gelu_tanh")
    assert mcore_shapes(arch)["position_embeddings.weight"] == (729, 1152)
    assert transformer_config(arch, 8).num_layers == 26  # select_layer -2


def test_arch_from_timm_and_open_clip() -> None:
    import open_clip
    from open_clip.model import _build_vision_tower

    trunk = neva_test_tiny_siglip()
    assert SiglipVisionArch.from_timm(trunk) == ARCH.replace(activation="gelu")  # timm's SigLIP: exact GELU
    tanh = neva_test_tiny_siglip(act_layer="gelu_tanh")
    assert SiglipVisionArch.from_timm(tanh) == ARCH
    cfg = open_clip.get_model_config("ViT-SO400M-14-SigLIP-384")
    with torch.device("meta"):
        visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"])
    assert SiglipVisionArch.from_open_clip(visual).num_patches == 729
    with pytest.raises(NevaError, match="not a timm"):
        SiglipVisionArch.from_open_clip(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"class_token": True}, "1 class/register tokens"),
        ({"reg_tokens": 4}, "4 class/register tokens"),
        ({"init_values": 0.1}, "LayerScale"),
        ({"qk_norm": True}, "qk_norm"),
        ({"pre_norm": True}, "pre-transformer norm"),
        ({"qkv_bias": False}, "attention without biases"),
    ],
)
def test_timm_variants_megatron_cannot_run(kwargs: dict, message: str) -> None:
    with pytest.raises(NevaError, match=message):
        SiglipVisionArch.from_timm(neva_test_tiny_siglip(**kwargs))


# ---------------------------------------------------------------------------------------------------------------
# Tables and conversion
# ---------------------------------------------------------------------------------------------------------------


def test_tables_agree() -> None:
    assert [(e.nemo, e.split) for e in HF_TABLE] == [(e.nemo, e.split) for e in TIMM_TABLE]
    splits = mcore_splits(ARCH, -1)
    assert set(splits) == set(mcore_shapes(ARCH, -1))
    assert "class_token" not in splits and "ln_pre.weight" not in splits and "ln_post.weight" not in splits
    assert splits["conv1.bias"] == "replicated" and splits["decoder.layers.2.self_attention.linear_qkv.bias"] == "qkv"
    assert splits["decoder.layers.0.mlp.linear_fc1.weight"] == "column"
    assert splits["decoder.layers.0.self_attention.linear_proj.weight"] == "row"


@pytest.mark.parametrize("prefix", ["", "vision_model."])
def test_hf_conversion(hf_state: dict[str, torch.Tensor], prefix: str) -> None:
    extra = {"text_model.embeddings.token_embedding.weight": torch.zeros(2), "logit_scale": torch.zeros(1),
             "logit_bias": torch.zeros(1)}  # fmt: skip
    state = {prefix + k: v for k, v in hf_state.items()} | (extra if prefix else {})
    full = hf_siglip_state_to_mcore(state, ARCH)
    assert {k: tuple(v.shape) for k, v in full.items()} == mcore_shapes(ARCH, -2)
    q, k, v = unfuse_qkv(full["decoder.layers.1.self_attention.linear_qkv.weight"], 4, 4)
    assert torch.equal(q, hf_state["encoder.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(k, hf_state["encoder.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(v, hf_state["encoder.layers.1.self_attn.v_proj.weight"])
    assert torch.equal(full["conv1.bias"], hf_state["embeddings.patch_embedding.bias"])


def test_timm_conversion() -> None:
    torch.manual_seed(0)
    trunk = perturb(neva_test_tiny_siglip())
    state = trunk.state_dict()
    unused = {"visual.head.proj.weight": torch.zeros(2), "text.token_embedding.weight": torch.zeros(2)}
    whole = {f"visual.trunk.{k}": v for k, v in state.items()} | unused
    for source in (state, whole):
        full = timm_siglip_state_to_mcore(source, ARCH, select_layer=-1)
        assert {k: tuple(v.shape) for k, v in full.items()} == mcore_shapes(ARCH, -1)
        assert torch.equal(full["position_embeddings.weight"], state["pos_embed"][0])
        # per head h: rows [q_h; k_h; v_h] (head_dim 16 each) from timm's [q; k; v]
        fused, qkv = full["decoder.layers.2.self_attention.linear_qkv.bias"], state["blocks.2.attn.qkv.bias"]
        assert torch.equal(fused[16:32], qkv[64:80]) and torch.equal(fused[48:64], qkv[16:32])


def test_hf_round_trip_is_bit_exact(hf_state: dict[str, torch.Tensor]) -> None:
    used = {k: v for k, v in hf_state.items() if not k.startswith(("post_layernorm.", "head."))}
    back = mcore_state_to_hf_siglip(hf_siglip_state_to_mcore(hf_state, ARCH, select_layer=-1), ARCH)
    assert set(back) == set(used) and all(torch.equal(back[k], used[k]) for k in used)
    with pytest.raises(NevaError, match=r"missing \['conv1.bias'\]"):
        mcore_state_to_hf_siglip({k: v for k, v in hf_siglip_state_to_mcore(hf_state, ARCH, select_layer=-1).items()
                                  if k != "conv1.bias"}, ARCH)  # fmt: skip


def test_tp_round_trip(hf_state: dict[str, torch.Tensor]) -> None:
    full = hf_siglip_state_to_mcore(hf_state, ARCH, select_layer=-1)
    splits = mcore_splits(ARCH, -1)
    for name, tensor in full.items():
        parts = [shard(tensor, splits[name], 2, r) for r in range(2)]
        assert torch.equal(merge(parts, splits[name], name=name), tensor), name
    qkv = "decoder.layers.0.self_attention.linear_qkv.weight"  # rank 1 of TP=2 holds heads 2 and 3 whole
    part = shard(full[qkv], splits[qkv], 2, 1)
    assert torch.equal(part[16:32], hf_state["encoder.layers.0.self_attn.k_proj.weight"][32:48])


def test_unknown_missing_and_misshapen_tensors(hf_state: dict[str, torch.Tensor]) -> None:
    from neva_tools.model.vision import vision_state_to_mcore

    bad = dict(hf_state) | {"encoder.layers.0.layer_scale": torch.ones(64)}
    del bad["encoder.layers.2.mlp.fc2.bias"]  # a dropped layer still has to be complete
    with pytest.raises(NevaError) as err:
        hf_siglip_state_to_mcore(bad, ARCH)
    assert "missing: encoder.layers.2.mlp.fc2.bias" in str(err.value)
    assert "unknown: encoder.layers.0.layer_scale" in str(err.value)
    bias = "embeddings.patch_embedding.bias"
    mixed = dict(hf_state) | {f"vision_model.{bias}": hf_state[bias]}
    with pytest.raises(NevaError, match="both with and without"):
        hf_siglip_state_to_mcore(mixed, ARCH)
    wrong = dict(hf_state) | {"embeddings.position_embedding.weight": torch.zeros(17, 64)}
    with pytest.raises(NevaError, match=r"expected \(16, 64\) for position_embeddings.weight"):
        hf_siglip_state_to_mcore(wrong, ARCH)
    with pytest.raises(NevaError, match="does not match a 3-layer SigLIP ViT"):
        timm_siglip_state_to_mcore(hf_state, ARCH)
    with pytest.raises(NevaError, match="kind 'hf' does not fit a SiglipVisionArch"):
        vision_state_to_mcore(hf_state, ARCH, "hf")


def test_transformer_config() -> None:
    cfg = transformer_config(ARCH, 2)
    assert (cfg.num_layers, cfg.kv_channels, cfg.vision_model_type, cfg.layernorm_epsilon) == (2, 16, "siglip", 1e-6)
    x = torch.randn(50)
    assert torch.equal(cfg.activation_func(x), torch.nn.functional.gelu(x, approximate="tanh"))
    with pytest.raises(NevaError, match=r"tensor_model_parallel_size \(3\) must divide"):
        transformer_config(ARCH, 3)


def test_image_processor_uses_siglip_normalisation() -> None:
    """The SigLIP processor equals HF's SiglipImageProcessor on an image of the model's size ([-1, 1] range)."""
    from PIL import Image
    from transformers import SiglipImageProcessor

    from neva_tools.data.images import CLIP_MEAN, ImageProcessor

    pixels = torch.randint(0, 256, (IMAGE, IMAGE, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    image = Image.fromarray(pixels.numpy())
    ours = ImageProcessor.for_encoder(vision_model_type(ARCH), IMAGE, "square")(image)
    theirs = SiglipImageProcessor(size={"height": IMAGE, "width": IMAGE})(image, return_tensors="pt")["pixel_values"]
    assert (ours - theirs[0]).abs().max().item() <= 1e-6
    assert ImageProcessor.for_encoder("clip", IMAGE).mean == CLIP_MEAN
    with pytest.raises(NevaError, match="no image normalisation for vision model type 'radio'"):
        ImageProcessor.for_encoder("radio", IMAGE)


# ---------------------------------------------------------------------------------------------------------------
# megatron-core: features at TP=1 and TP=2, and a NeVA training step
# ---------------------------------------------------------------------------------------------------------------
