"""megatron-core CLIPViTModel loaded from open_clip and Hugging Face CLIP: fp32 feature parity at TP=1 and TP=2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from dist_helpers import in_process_distributed, run_distributed

from neva_tools.errors import NevaError

TOL = 1e-4
VISION_CFG = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 3, "head_width": 16, "mlp_ratio": 2.0}
OPEN_CLIP_CFG = {
    "embed_dim": 32, "quick_gelu": True, "vision_cfg": VISION_CFG,
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}  # fmt: skip
HF_CFG = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
          "image_size": 32, "patch_size": 8}  # fmt: skip


def _perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Random values everywhere (layer norms too), so a swapped or misplaced tensor cannot go unnoticed."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _open_clip_reference(model: torch.nn.Module, images: torch.Tensor, select_layer: int = -2) -> torch.Tensor:
    """Output of resblock ``select_layer`` (before ln_post) of an open_clip visual, class token dropped."""
    visual = model.visual
    out: list[torch.Tensor] = []
    hook = visual.transformer.resblocks[select_layer].register_forward_hook(lambda m, i, o: out.append(o))
    with torch.no_grad():
        visual(images)
    hook.remove()
    x = out[0] if visual.transformer.batch_first else out[0].transpose(0, 1)
    return x[:, 1:, :]


def _hf_reference(model: torch.nn.Module, images: torch.Tensor, select_layer: int = -2) -> torch.Tensor:
    """LLaVA's features: ``hidden_states[select_layer]`` with the class token dropped."""
    with torch.no_grad():
        return model(pixel_values=images, output_hidden_states=True).hidden_states[select_layer][:, 1:, :]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Tiny random open_clip (local-dir layout and a bare checkpoint), HF CLIPVisionModel and CLIPModel dirs."""
    import open_clip
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

    root = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    oc = _perturb(open_clip.model.CLIP(**OPEN_CLIP_CFG))
    oc_dir = root / "open_clip"
    oc_dir.mkdir()
    (oc_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": OPEN_CLIP_CFG}))
    torch.save(oc.state_dict(), oc_dir / "open_clip_pytorch_model.bin")
    (root / "registry").mkdir()
    (root / "registry" / "neva-test-tiny-vit.json").write_text(json.dumps(OPEN_CLIP_CFG))
    open_clip.add_model_config(root / "registry")

    hf = _perturb(CLIPVisionModel(CLIPVisionConfig(**HF_CFG)))
    hf.save_pretrained(root / "hf_vision")
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 64, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}  # fmt: skip
    full = CLIPModel(CLIPConfig(vision_config=HF_CFG, text_config=text))
    full.vision_model.load_state_dict(hf.state_dict())
    full.save_pretrained(root / "hf_clip")
    images = _images()
    return {
        "open_clip": oc_dir,
        "open_clip_ckpt": oc_dir / "open_clip_pytorch_model.bin",
        "hf_vision": root / "hf_vision",
        "hf_clip": root / "hf_clip",
        "images": images,
        "open_clip_ref": _open_clip_reference(oc, images),
        "hf_ref": _hf_reference(hf, images),
        "hf_ref_last": _hf_reference(hf, images, -1),
        "hf_ref_first": _hf_reference(hf, images, 1),
    }


@pytest.fixture(scope="module")
def tp1() -> object:
    with in_process_distributed(tp=1):
        yield


def _features(source: object, images: torch.Tensor, select_layer: int = -2, **kwargs: object) -> torch.Tensor:
    from neva_tools.model.vision import load_clip_vision, vision_features

    model, _ = load_clip_vision(source, select_layer=select_layer, **kwargs)
    with torch.no_grad():
        return vision_features(model.eval(), images)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape == (2, 16, 64)
    return (a - b).abs().max().item()


@pytest.mark.usefixtures("tp1")
def test_open_clip_parity_tp1(checkpoints: dict) -> None:
    feats = _features(checkpoints["open_clip"], checkpoints["images"])
    assert _max_diff(feats, checkpoints["open_clip_ref"]) <= TOL
    named = _features("neva-test-tiny-vit", checkpoints["images"], pretrained=checkpoints["open_clip_ckpt"])
    assert torch.equal(named, feats)


@pytest.mark.usefixtures("tp1")
@pytest.mark.parametrize(("select_layer", "ref"), [(-2, "hf_ref"), (-1, "hf_ref_last"), (1, "hf_ref_first")])
def test_hf_parity_tp1(checkpoints: dict, select_layer: int, ref: str) -> None:
    feats = _features(checkpoints["hf_vision"], checkpoints["images"], select_layer)
    assert _max_diff(feats, checkpoints[ref]) <= TOL


@pytest.mark.usefixtures("tp1")
def test_hf_full_clip_model_dir(checkpoints: dict) -> None:
    """A CLIPModel directory (``vision_model.`` names, text tower ignored) gives the same features."""
    feats = _features(checkpoints["hf_clip"], checkpoints["images"])
    assert _max_diff(feats, checkpoints["hf_ref"]) <= TOL


@pytest.mark.usefixtures("tp1")
def test_fits_llava_vision_model(checkpoints: dict) -> None:
    """Our model's state dict is what LLaVAModel's vision_model holds, built from the same config."""
    from neva_tiny import LLM, VOCAB

    from neva_tools.mappings.clip import ClipVisionArch, transformer_config
    from neva_tools.model.neva import NevaParts, build_neva_model
    from neva_tools.model.vision import build_clip_vit

    arch = ClipVisionArch.from_hf_config(json.loads((checkpoints["hf_vision"] / "config.json").read_text()))
    llava = build_neva_model(NevaParts(LLM, VOCAB, transformer_config(arch, 1), arch.image_size, arch.patch_size))
    theirs = {k.removeprefix("vision_model."): v.shape for k, v in llava.state_dict().items()
              if k.startswith("vision_model.") and not k.endswith("_extra_state")}  # fmt: skip
    ours = {k: v.shape for k, v in build_clip_vit(arch).state_dict().items() if not k.endswith("_extra_state")}
    assert ours == theirs


def test_vit_layer_spec_is_bidirectional() -> None:
    from megatron.core.transformer.enums import AttnMaskType

    from neva_tools.model.vision import vit_layer_spec

    assert vit_layer_spec().submodules.self_attention.params["attn_mask_type"] == AttnMaskType.no_mask


def test_bad_sources(tmp_path: Path, checkpoints: dict) -> None:
    from neva_tools.model.vision import read_clip_vision

    with pytest.raises(NevaError, match="needs pretrained"):
        read_clip_vision("ViT-L-14-336")
    with pytest.raises(NevaError, match="download hub models first"):
        read_clip_vision("hf-hub:timm/ViT-B-16-SigLIP")
    with pytest.raises(NevaError, match="not a Hugging Face CLIP directory"):
        read_clip_vision(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "dinov2"}))  # SigLIP: tests/mappings/test_siglip.py
    with pytest.raises(NevaError, match="'dinov2' is not a CLIP or SigLIP vision model"):
        read_clip_vision(tmp_path)
    with pytest.raises(NevaError, match="do not pass pretrained"):
        read_clip_vision(checkpoints["open_clip"], pretrained=checkpoints["open_clip_ckpt"])


def _tp2_features(rank: int, world_size: int, open_clip_dir: str, hf_dir: str, images: torch.Tensor) -> dict:
    from neva_tools.model.parallel import destroy_distributed, init_distributed

    init_distributed(tp=world_size, seed=1234)
    try:
        from neva_tools.model.vision import load_clip_vision, vision_features

        out = {}
        for name, source in (("open_clip", open_clip_dir), ("hf", hf_dir)):
            model, _ = load_clip_vision(source)
            with torch.no_grad():
                out[name] = vision_features(model.eval(), images)
            out[name + "_qkv_rows"] = model.decoder.layers[0].self_attention.linear_qkv.weight.shape[0]
        return out
    finally:
        destroy_distributed()


def test_parity_tp2(checkpoints: dict) -> None:
    results = run_distributed(
        _tp2_features, 2, str(checkpoints["open_clip"]), str(checkpoints["hf_vision"]), checkpoints["images"]
    )
    for out in results:
        assert out["open_clip_qkv_rows"] == out["hf_qkv_rows"] == 3 * 64 // 2  # each rank holds 2 of 4 heads
        assert _max_diff(out["open_clip"], checkpoints["open_clip_ref"]) <= TOL
        assert _max_diff(out["hf"], checkpoints["hf_ref"]) <= TOL
