"""CLIP vision weight tables: names, shapes, the per-head QKV layout, TP round trips and error reporting."""

from __future__ import annotations

import pytest
import torch

from neva_tools.checkpoint.tp import merge, shard
from neva_tools.errors import NevaError
from neva_tools.mappings.clip import (
    HF_TABLE,
    OPEN_CLIP_TABLE,
    ClipVisionArch,
    hf_clip_state_to_mcore,
    mcore_shapes,
    mcore_splits,
    open_clip_state_to_mcore,
    quick_gelu,
    transformer_config,
)
from neva_tools.mappings.transforms import unfuse_qkv

ARCH = ClipVisionArch(
    image_size=32, patch_size=8, hidden_size=64, num_layers=3, num_heads=4, ffn_hidden_size=128, activation="quick_gelu"
)


def _open_clip_visual(**kwargs: object) -> torch.nn.Module:
    from open_clip.transformer import QuickGELU, VisionTransformer

    torch.manual_seed(0)
    args = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 3, "heads": 4, "mlp_ratio": 2.0,
            "output_dim": 32, "act_layer": QuickGELU, **kwargs}  # fmt: skip
    return VisionTransformer(**args)


def _hf_vision(**kwargs: object) -> torch.nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                           image_size=32, patch_size=8, **kwargs)  # fmt: skip
    return CLIPVisionModel(cfg)


@pytest.fixture(scope="module")
def open_clip_state() -> dict[str, torch.Tensor]:
    return dict(_open_clip_visual().state_dict())


@pytest.fixture(scope="module")
def hf_state() -> dict[str, torch.Tensor]:
    return dict(_hf_vision().state_dict())


def _check_shapes(full: dict[str, torch.Tensor], select_layer: int) -> None:
    expected = mcore_shapes(ARCH, select_layer)
    assert set(full) == set(expected)
    assert {k: tuple(v.shape) for k, v in full.items()} == expected


def test_arch_from_models() -> None:
    assert ClipVisionArch.from_open_clip(_open_clip_visual()) == ARCH
    assert ClipVisionArch.from_open_clip(_open_clip_visual(act_layer=torch.nn.GELU)).activation == "gelu"
    assert ClipVisionArch.from_hf_config(_hf_vision().config.to_dict()) == ARCH


def test_hf_config_defaults_match_transformers() -> None:
    from transformers import CLIPConfig, CLIPVisionConfig

    assert ClipVisionArch.from_hf_config({}) == ClipVisionArch.from_hf_config(CLIPVisionConfig().to_dict())
    full = CLIPConfig(vision_config={"hidden_size": 64, "num_attention_heads": 4}).to_dict()
    assert ClipVisionArch.from_hf_config(full).hidden_size == 64
    with pytest.raises(NevaError, match="hidden_act 'relu'"):
        ClipVisionArch.from_hf_config({"hidden_act": "relu"})
    with pytest.raises(NevaError, match="'llama' is not a CLIP vision model"):
        ClipVisionArch.from_hf_config({"model_type": "llama"})


def test_unsupported_open_clip_variants() -> None:
    with pytest.raises(NevaError, match="LayerScale"):
        ClipVisionArch.from_open_clip(_open_clip_visual(ls_init_value=0.1))
    with pytest.raises(NevaError, match="no_ln_pre"):
        ClipVisionArch.from_open_clip(_open_clip_visual(no_ln_pre=True))
    with pytest.raises(NevaError, match="custom attention"):
        ClipVisionArch.from_open_clip(_open_clip_visual(qk_norm=True))


def test_tables_agree() -> None:
    assert [(e.nemo, e.split) for e in OPEN_CLIP_TABLE] == [(e.nemo, e.split) for e in HF_TABLE]
    splits = mcore_splits(ARCH, -1)
    assert splits["decoder.layers.2.self_attention.linear_qkv.weight"] == "qkv"
    assert splits["decoder.layers.0.mlp.linear_fc2.bias"] == "replicated"


@pytest.mark.parametrize("select_layer", [-2, -1, 1])
def test_open_clip_conversion(open_clip_state: dict[str, torch.Tensor], select_layer: int) -> None:
    full = open_clip_state_to_mcore(open_clip_state, ARCH, select_layer=select_layer)
    _check_shapes(full, select_layer)
    assert torch.equal(full["class_token"].flatten(), open_clip_state["class_embedding"])
    q, k, v = unfuse_qkv(full["decoder.layers.0.self_attention.linear_qkv.weight"], 4, 4)
    assert torch.equal(torch.cat([q, k, v]), open_clip_state["transformer.resblocks.0.attn.in_proj_weight"])
    # per head h: rows [q_h; k_h; v_h] (head_dim 16 each)
    fused = full["decoder.layers.0.self_attention.linear_qkv.bias"]
    in_proj = open_clip_state["transformer.resblocks.0.attn.in_proj_bias"]
    assert torch.equal(fused[16:32], in_proj[64:80]) and torch.equal(fused[48:64], in_proj[16:32])


def test_open_clip_whole_model_state_is_accepted(open_clip_state: dict[str, torch.Tensor]) -> None:
    whole = {f"visual.{k}": v for k, v in open_clip_state.items()} | {"text_projection": torch.zeros(2)}
    full = open_clip_state_to_mcore(whole, ARCH)
    assert torch.equal(full["conv1.weight"], open_clip_state["conv1.weight"])


@pytest.mark.parametrize("prefix", ["", "vision_model."])
def test_hf_conversion(hf_state: dict[str, torch.Tensor], prefix: str) -> None:
    extra = {"text_model.embeddings.token_embedding.weight": torch.zeros(2), "logit_scale": torch.zeros(())}
    state = {prefix + k: v for k, v in hf_state.items()} | (extra if prefix else {})
    full = hf_clip_state_to_mcore(state, ARCH)
    _check_shapes(full, -2)
    q, k, v = unfuse_qkv(full["decoder.layers.1.self_attention.linear_qkv.weight"], 4, 4)
    assert torch.equal(q, hf_state["encoder.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(k, hf_state["encoder.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(v, hf_state["encoder.layers.1.self_attn.v_proj.weight"])
    assert torch.equal(full["ln_pre.bias"], hf_state["pre_layrnorm.bias"])


def test_unknown_and_missing_keys(open_clip_state: dict[str, torch.Tensor], hf_state: dict[str, torch.Tensor]) -> None:
    bad = dict(open_clip_state)
    bad["transformer.resblocks.0.ls_1.gamma"] = torch.ones(64)
    del bad["transformer.resblocks.2.ln_2.bias"]  # a dropped layer still has to be complete
    with pytest.raises(NevaError) as err:
        open_clip_state_to_mcore(bad, ARCH)
    assert "missing: transformer.resblocks.2.ln_2.bias" in str(err.value)
    assert "unknown: transformer.resblocks.0.ls_1.gamma" in str(err.value)
    mixed = dict(hf_state) | {"vision_model.pre_layrnorm.bias": hf_state["pre_layrnorm.bias"]}
    with pytest.raises(NevaError, match="both with and without"):
        hf_clip_state_to_mcore(mixed, ARCH)
    wrong = dict(hf_state) | {"embeddings.position_embedding.weight": torch.zeros(10, 64)}
    with pytest.raises(NevaError, match=r"expected \(17, 64\)"):
        hf_clip_state_to_mcore(wrong, ARCH)


def test_tp_round_trip(hf_state: dict[str, torch.Tensor]) -> None:
    full = hf_clip_state_to_mcore(hf_state, ARCH, select_layer=-1)
    splits = mcore_splits(ARCH, -1)
    for name, tensor in full.items():
        parts = [shard(tensor, splits[name], 2, r) for r in range(2)]
        assert torch.equal(merge(parts, splits[name], name=name), tensor), name
    # rank 1 of TP=2 holds heads 2 and 3 whole: [q2, k2, v2, q3, k3, v3]
    qkv = "decoder.layers.0.self_attention.linear_qkv.weight"
    part = shard(full[qkv], splits[qkv], 2, 1)
    assert torch.equal(part[:16], hf_state["encoder.layers.0.self_attn.q_proj.weight"][32:48])
    assert torch.equal(part[16:32], hf_state["encoder.layers.0.self_attn.k_proj.weight"][32:48])


def test_select_layer_bounds() -> None:
    assert (ARCH.kept_layers(-2), ARCH.kept_layers(-1), ARCH.kept_layers(-3), ARCH.kept_layers(3)) == (2, 3, 1, 3)
    for bad in (0, 4, -4):
        with pytest.raises(NevaError, match="select_layer"):
            ARCH.kept_layers(bad)


def test_transformer_config() -> None:
    cfg = transformer_config(ARCH, 2)
    assert (cfg.num_layers, cfg.num_query_groups, cfg.kv_channels, cfg.vision_model_type) == (2, 4, 16, "clip")
    assert cfg.activation_func is quick_gelu and not cfg.gated_linear_unit and cfg.add_qkv_bias
    with pytest.raises(NevaError, match=r"tensor_model_parallel_size \(3\) must divide the vision num_attention_heads"):
        transformer_config(ARCH, 3)


def test_quick_gelu_matches_references() -> None:
    from open_clip.transformer import QuickGELU
    from transformers.activations import ACT2FN

    x = torch.randn(100)
    assert torch.allclose(quick_gelu(x), QuickGELU()(x))
    assert torch.allclose(quick_gelu(x), ACT2FN["quick_gelu"](x))
