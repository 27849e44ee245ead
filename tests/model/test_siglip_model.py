"""The megatron-core siglip ``CLIPViTModel`` built from SigLIP towers: fp32 feature parity with HF and open_clip at
TP=1 and TP=2, and a tiny NeVA (``LLaVAModel``, ``vision_model_type`` siglip) training step.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "mappings"))
from dist_helpers import in_process_distributed, run_distributed
from neva_tiny import LLM, VOCAB, batch, loss_of
from siglip_tiny import ARCH, TOL, build_checkpoints, max_diff

from neva_tools.mappings.siglip import mcore_shapes


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return build_checkpoints(tmp_path_factory.mktemp("siglip"))


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
    assert max_diff(feats, checkpoints[f"hf_{select_layer}"]) <= TOL


@pytest.mark.usefixtures("tp1")
def test_whole_siglip_model_and_open_clip_parity_tp1(checkpoints: dict) -> None:
    from neva_tools.model.vision import read_clip_vision

    assert max_diff(_features(checkpoints["hf_siglip"], checkpoints["images"]), checkpoints["hf_-2"]) <= TOL
    assert max_diff(_features(checkpoints["open_clip"], checkpoints["images"]), checkpoints["open_clip_ref"]) <= TOL
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
    assert max_diff(out["features"], checkpoints["hf_-2"]) <= TOL  # LLaVAModel's vision_model = HF's layer -2
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
        assert max_diff(out["hf"], checkpoints["hf_-2"]) <= TOL
        assert max_diff(out["open_clip"], checkpoints["open_clip_ref"]) <= TOL
        assert max_diff(out["neva"]["features"], checkpoints["hf_-2"]) <= TOL
        assert abs(out["neva"]["loss"] - tp1["loss"]) <= 1e-5
        assert out["neva"]["changed"] and {n.split(".")[0] for n in out["neva"]["changed"]} == {
            "vision_model", "vision_projection"}  # fmt: skip
