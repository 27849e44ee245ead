"""SigLIP vision towers (HF and open_clip/timm) on megatron-core's ``CLIPViTModel`` (siglip): tables and errors, fp32
feature parity at TP=1 and TP=2, and a tiny NeVA (``LLaVAModel``, ``vision_model_type`` siglip) training step.

The tiny towers take 30 px images in 7 px patches: 4 x 4 patches covering 28 px, the remainder dropped by the
"valid" patch convolution as in SigLIP so400m/14 at 384 px (27 x 27 = 729 patches covering 378 px).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from timm.models import build_model_with_cfg, register_model
from timm.models.vision_transformer import VisionTransformer

sys.path.insert(0, str(Path(__file__).parents[1] / "model"))

from dist_helpers import in_process_distributed, run_distributed
from neva_tiny import LLM, VOCAB, batch, loss_of

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


def _perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Random values everywhere (layer norms, biases too), so a swapped or misplaced tensor cannot go unnoticed."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _hf_vision() -> torch.nn.Module:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    return _perturb(SiglipVisionModel(SiglipVisionConfig(**HF_CFG)))


def _hf_reference(model: torch.nn.Module, images: torch.Tensor, select_layer: int) -> torch.Tensor:
    """``hidden_states[select_layer]`` (no ``post_layernorm``; SigLIP has no class token to drop)."""
    with torch.no_grad():
        return model(pixel_values=images, output_hidden_states=True).hidden_states[select_layer]


@pytest.fixture(scope="module")
def hf_state() -> dict[str, torch.Tensor]:
    return dict(_hf_vision().state_dict())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Tiny random HF SiglipVisionModel and SiglipModel directories and an open_clip (timm) SigLIP directory."""
    import open_clip
    from transformers import SiglipConfig, SiglipModel

    root = tmp_path_factory.mktemp("siglip")
    hf = _hf_vision()
    hf.save_pretrained(root / "hf_vision")
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 64, "max_position_embeddings": 8, "bos_token_id": 0, "eos_token_id": 1,
            "pad_token_id": 1}  # fmt: skip
    full = SiglipModel(SiglipConfig(vision_config=HF_CFG, text_config=text))
    full.vision_model.load_state_dict(hf.state_dict())
    full.save_pretrained(root / "hf_siglip")

    torch.manual_seed(1)
    oc = _perturb(open_clip.model.CLIP(**OPEN_CLIP_CFG))
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
    refs = {f"hf_{layer}": _hf_reference(hf, images, layer) for layer in (-2, -1, 1)}
    return {"hf_vision": root / "hf_vision", "hf_siglip": root / "hf_siglip", "open_clip": oc_dir,
            "images": images, "open_clip_ref": out[0], **refs}  # fmt: skip


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape == (2, 16, 64)
    return (a - b).abs().max().item()


def test_references_tell_layers_apart(checkpoints: dict) -> None:
    """The parity checks below can fail: neighbouring layers' features differ by far more than the tolerance."""
    assert _max_diff(checkpoints["hf_-2"], checkpoints["hf_-1"]) > 100 * TOL
    assert _max_diff(checkpoints["hf_-2"], checkpoints["hf_1"]) > 100 * TOL


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
    trunk = _perturb(neva_test_tiny_siglip())
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


@pytest.fixture(scope="module")
def tp1() -> Any:
    with in_process_distributed(tp=1):
        yield


def _features(source: object, images: torch.Tensor, select_layer: int = -2) -> torch.Tensor:
    from neva_tools.model.vision import load_clip_vision, vision_features

    model, _ = load_clip_vision(source, select_layer=select_layer)
    assert model.ln_pre is None and model.ln_post is None and not model.add_class_token
    with torch.no_grad():
        return vision_features(model.eval(), images)


@pytest.mark.usefixtures("tp1")
@pytest.mark.parametrize("select_layer", [-2, -1, 1])
def test_hf_parity_tp1(checkpoints: dict, select_layer: int) -> None:
    feats = _features(checkpoints["hf_vision"], checkpoints["images"], select_layer)
    assert _max_diff(feats, checkpoints[f"hf_{select_layer}"]) <= TOL


@pytest.mark.usefixtures("tp1")
def test_whole_siglip_model_and_open_clip_parity_tp1(checkpoints: dict) -> None:
    from neva_tools.model.vision import read_clip_vision

    assert _max_diff(_features(checkpoints["hf_siglip"], checkpoints["images"]), checkpoints["hf_-2"]) <= TOL
    assert _max_diff(_features(checkpoints["open_clip"], checkpoints["images"]), checkpoints["open_clip_ref"]) <= TOL
    assert read_clip_vision(checkpoints["hf_siglip"])[2] == "hf_siglip"
    assert read_clip_vision(checkpoints["open_clip"])[2] == "open_clip_siglip"


def _neva_step(hf_dir: str, images: torch.Tensor) -> dict[str, Any]:
    """A tiny NeVA on a SigLIP encoder (LLM frozen, vision and projector trained): one AdamW step."""
    from megatron.core import parallel_state

    from neva_tools.model.neva import NevaParts, build_neva_model, freeze
    from neva_tools.model.vision import (
        load_mcore_state,
        read_clip_vision,
        vision_splits,
        vision_state_to_mcore,
        vision_transformer_config,
    )
    from neva_tools.train.optim import OptimSettings, build_optimizer

    tp = parallel_state.get_tensor_model_parallel_world_size()
    state, arch, kind = read_clip_vision(hf_dir)
    torch.manual_seed(7)  # the same LLM and projector at every TP (CPU initialization splits full tensors)
    parts = NevaParts({**LLM, "tensor_model_parallel_size": tp}, VOCAB, vision_transformer_config(arch, tp),
                      arch.image_size, arch.patch_size)  # fmt: skip
    model = build_neva_model(parts)
    load_mcore_state(model.vision_model, vision_state_to_mcore(state, arch, kind), vision_splits(arch))
    freeze(model, llm=True, vision=False)
    with torch.no_grad():
        features = model.vision_model(images)
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    optimizer = build_optimizer(model, OptimSettings(lr=1e-3))
    loss = loss_of(model, {**batch(), "images": images})
    loss.backward()
    optimizer.step()
    changed = {k for k, v in model.state_dict().items() if k in before and not torch.equal(before[k], v)}
    return {"loss": loss.item(), "features": features, "changed": changed, "names": set(before),
            "img_seq_len": model.img_seq_len}  # fmt: skip


@pytest.mark.usefixtures("tp1")
def test_neva_training_step_tp1(checkpoints: dict) -> None:
    from neva_tools.model.vision import build_clip_vit

    out = _neva_step(str(checkpoints["hf_vision"]), checkpoints["images"])
    assert out["img_seq_len"] == 16  # 4 x 4 patches, no class token
    assert _max_diff(out["features"], checkpoints["hf_-2"]) <= TOL  # LLaVAModel's vision_model = HF's layer -2
    vision = {n.removeprefix("vision_model.") for n in out["names"] if n.startswith("vision_model.")}
    assert vision == set(mcore_shapes(ARCH)) == {k for k in build_clip_vit(ARCH).state_dict() if "_extra" not in k}
    assert out["loss"] > 0 and torch.isfinite(torch.tensor(out["loss"]))
    assert {n.split(".")[0] for n in out["changed"]} == {"vision_model", "vision_projection"}
    assert {"vision_model.conv1.bias", "vision_model.position_embeddings.weight"} <= out["changed"]


def _tp2(rank: int, world_size: int, hf_dir: str, open_clip_dir: str, images: torch.Tensor) -> dict[str, Any]:
    from neva_tools.model.parallel import destroy_distributed, init_distributed

    init_distributed(tp=world_size, seed=1234)
    try:
        from neva_tools.model.vision import load_clip_vision, vision_features

        out: dict[str, Any] = {}
        for name, source in (("hf", hf_dir), ("open_clip", open_clip_dir)):
            model, _ = load_clip_vision(source)
            with torch.no_grad():
                out[name] = vision_features(model.eval(), images)
            out[name + "_qkv_rows"] = model.decoder.layers[0].self_attention.linear_qkv.weight.shape[0]
        out["neva"] = _neva_step(hf_dir, images)
        return out
    finally:
        destroy_distributed()


@pytest.mark.usefixtures("tp1")
def test_parity_and_training_step_tp2(checkpoints: dict) -> None:
    tp1 = _neva_step(str(checkpoints["hf_vision"]), checkpoints["images"])
    results = run_distributed(_tp2, 2, str(checkpoints["hf_vision"]), str(checkpoints["open_clip"]),
                              checkpoints["images"])  # fmt: skip
    for out in results:
        assert out["hf_qkv_rows"] == out["open_clip_qkv_rows"] == 3 * 64 // 2  # each rank holds 2 of 4 heads
        assert _max_diff(out["hf"], checkpoints["hf_-2"]) <= TOL
        assert _max_diff(out["open_clip"], checkpoints["open_clip_ref"]) <= TOL
        assert _max_diff(out["neva"]["features"], checkpoints["hf_-2"]) <= TOL
        assert abs(out["neva"]["loss"] - tp1["loss"]) <= 1e-5
        assert out["neva"]["changed"] and {n.split(".")[0] for n in out["neva"]["changed"]} == {
            "vision_model", "vision_projection"}  # fmt: skip
