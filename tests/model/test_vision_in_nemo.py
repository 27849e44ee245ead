"""A trained vision tower in the NeVA ``.nemo`` (CLIP and SigLIP): saved TP-split at TP=2, read back, repartitioned
bit-exactly, loaded for inference and exported; a file that trained its tower without storing it is refused."""

from __future__ import annotations

import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "inference"))
from dist_helpers import in_process_distributed, run_distributed
from tiny_neva import build_assets

from neva_tools.checkpoint import nemo_vision
from neva_tools.checkpoint import tp as tp_rules
from neva_tools.checkpoint.nemo_archive import NemoArchive
from neva_tools.errors import NevaError
from neva_tools.mappings.base import Split

SELECT = -2  # 3-layer towers: the first 2 layers are stored


def save_job(rank: int, world_size: int, llm: str, vision: str, tokenizer: str, out: str, old: str) -> dict:
    """Build a TP=2 NeVA, move every vision weight (as training would), save it with its tower (``out``) and as a
    file written before towers were stored (``old``); return this rank's vision shard."""
    from neva_tools.model import neva_io
    from neva_tools.model.parallel import init_distributed
    from neva_tools.model.vision import read_clip_vision, vision_state_to_mcore

    init_distributed(tp=world_size, seed=1)
    state, arch, kind = read_clip_vision(vision)
    full = vision_state_to_mcore(state, arch, kind, select_layer=SELECT)
    cfg, vocab = neva_io.llm_config(llm)
    model = neva_io.build_neva(llm, cfg, vocab, arch, full, select_layer=SELECT, projector_type="mlp2x_gelu")
    with torch.no_grad():
        for name, param in model.vision_model.named_parameters():  # the same noise on every rank (replicas agree)
            generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    vision_info = {"image_size": arch.image_size, "patch_size": arch.patch_size, "source": vision}
    config = {**cfg, "vocab_size": vocab, "data": {"conv_template": "vicuna_v1", "image_aspect_ratio": "pad"},
              "mm_cfg": {"mm_mlp_adapter_type": "mlp2x_gelu",
                         "llm": {"from_pretrained": llm, "freeze": True, "model_type": "vicuna_v1"},
                         "vision_encoder": {"from_pretrained": vision, "freeze": False,
                                            "vision_select_layer": SELECT}}}  # fmt: skip
    new = {**config, "vision": {**vision_info, "arch": nemo_vision.arch_record(arch)}}
    neva_io.save_neva_nemo(model, out, new, include_llm=False, projector_type="mlp2x_gelu", tokenizer=tokenizer,
                           include_vision=True)  # fmt: skip
    neva_io.save_neva_nemo(model, old, {**config, "vision": vision_info}, include_llm=False,
                           projector_type="mlp2x_gelu", tokenizer=tokenizer)  # fmt: skip
    return {k: v.detach().clone() for k, v in model.vision_model.state_dict().items() if not k.endswith("_extra_state")}


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    root = tmp_path_factory.mktemp("vision_in_nemo")
    assets = build_assets(root, train=2)
    torch.manual_seed(3)
    siglip = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                image_size=28, patch_size=7)  # fmt: skip
    SiglipVisionModel(siglip).save_pretrained(str(root / "siglip"))
    return {**assets, "siglip": root / "siglip"}


@pytest.fixture(scope="module", params=["clip", "siglip"])
def saved(request: pytest.FixtureRequest, assets: dict[str, Any]) -> dict[str, Any]:
    """Per family: the TP=2 ``.nemo`` with its trained tower, the old-style file, each rank's vision shard."""
    family = request.param
    root = assets["root"]
    out, old = root / f"{family}.nemo", root / f"{family}_old.nemo"
    shards = run_distributed(save_job, 2, str(assets["llm"]), str(assets[family]), str(assets["tokenizer"]),
                             str(out), str(old), timeout=300)  # fmt: skip
    return {"family": family, "nemo": out, "old": old, "shards": shards, "vision": assets[family]}


@pytest.fixture(scope="module")
def session() -> Iterator[None]:
    with in_process_distributed():
        yield


def _original(vision: Path) -> dict[str, torch.Tensor]:
    from neva_tools.model.vision import read_clip_vision, vision_state_to_mcore

    state, arch, kind = read_clip_vision(vision)
    return vision_state_to_mcore(state, arch, kind, select_layer=SELECT)


def _tower(path: Path) -> nemo_vision.StoredTower:
    with NemoArchive(path) as archive:
        tower = nemo_vision.read_tower(archive)
    assert tower is not None
    return tower


def test_tower_is_stored_split_by_the_tables(saved: dict[str, Any]) -> None:
    with NemoArchive(saved["nemo"]) as archive:
        cfg = archive.read_config()
        ranks = [archive.load_legacy(r) for r in range(2)]
    arch = nemo_vision.arch_from_record(cfg["vision"]["arch"], "test")
    assert cfg["vision"]["stored"] is True and cfg["vision"]["arch"]["model_type"] == saved["family"]
    splits = nemo_vision.splits(arch, SELECT)
    assert {k for k in ranks[0] if k.startswith(nemo_vision.PREFIX)} == set(splits)
    assert splits[nemo_vision.PREFIX + "decoder.layers.1.self_attention.linear_qkv.weight"] is Split.QKV
    assert ranks[0][nemo_vision.PREFIX + "decoder.layers.1.self_attention.linear_qkv.weight"].shape == (48, 32)
    tower = _tower(saved["nemo"])
    assert tower.arch == arch and tower.select_layer == SELECT
    original = _original(saved["vision"])
    assert tower.tensors.keys() == original.keys()
    for name, full in tower.tensors.items():
        split = splits[nemo_vision.PREFIX + name]
        for rank, shard in enumerate(saved["shards"]):  # what each rank trained is what the file gives it back
            assert torch.equal(tp_rules.shard(full, split, 2, rank), shard[name]), (name, rank)
        assert not torch.equal(full, original[name]), name  # the trained tower, not the original


def test_repartition_with_the_tower_is_bit_exact(saved: dict[str, Any], tmp_path: Path) -> None:
    from neva_tools.convert.repartition import repartition

    tp1, tp2 = tmp_path / "tp1.nemo", tmp_path / "tp2.nemo"
    repartition(saved["nemo"], tp1, tp=1)
    repartition(tp1, tp2, tp=2)
    with NemoArchive(saved["nemo"]) as a, NemoArchive(tp2) as b:
        for rank in range(2):
            first, again = a.load_legacy(rank), b.load_legacy(rank)
            assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    back = tmp_path / "tp1_again.nemo"
    repartition(tp2, back, tp=1)
    with NemoArchive(tp1) as a, NemoArchive(back) as b:
        first, again = a.load_legacy(), b.load_legacy()
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    merged = _tower(saved["nemo"]).tensors
    assert all(torch.equal(first[nemo_vision.PREFIX + k], v) for k, v in merged.items())  # TP=1 holds the full tower
    with pytest.raises(NevaError, match=r"stores a trained vision tower .* use --format legacy"):
        repartition(saved["nemo"], tmp_path / "dist.nemo", tp=1, fmt="dist")


def test_inference_loads_the_stored_tower(session: None, saved: dict[str, Any]) -> None:
    from neva_tools.inference.load import load_neva

    loaded = load_neva(saved["nemo"])  # TP=1 here: the TP=2 shards merged by the table's rules
    state = {k: v for k, v in loaded.model.vision_model.state_dict().items() if not k.endswith("_extra_state")}
    tower = _tower(saved["nemo"]).tensors
    assert state.keys() == tower.keys() and all(torch.equal(state[k], tower[k]) for k in state)
    assert loaded.image_processor.image_size == 28


def test_a_trained_tower_missing_from_the_file_is_refused(session: None, saved: dict[str, Any],
                                                          tmp_path: Path) -> None:  # fmt: skip
    from neva_tools.export.hf_llava import export_hf_llava
    from neva_tools.inference.load import load_neva

    with NemoArchive(saved["old"]) as archive:
        assert not any(k.startswith(nemo_vision.PREFIX) for k in archive.load_legacy(0))
    match = r"old\.nemo was trained with an unfrozen vision tower .* --all-checkpoints"
    with pytest.raises(NevaError, match=match):
        load_neva(saved["old"])
    with pytest.raises(NevaError, match=match):
        export_hf_llava(saved["old"], tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    loaded = load_neva(saved["old"], vision=saved["vision"])  # an explicit tower is taken as the trained one
    original = _original(saved["vision"])
    state = loaded.model.vision_model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in original.items())


def test_export_writes_the_trained_tower(saved: dict[str, Any], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from neva_tools.export.hf_llava import export_hf_llava
    from neva_tools.export.vision import mcore_to_hf

    out = export_hf_llava(saved["nemo"], tmp_path / "hf")  # CLIP or SigLIP: the family's table
    exported = {}
    for shard in sorted(out.glob("*.safetensors")):
        exported.update(load_file(str(shard)))
    prefix = "vision_tower.vision_model."
    stored = _tower(saved["nemo"])
    trained = mcore_to_hf(stored.tensors, stored.arch, SELECT)
    assert all(torch.equal(exported[prefix + k], v) for k, v in trained.items())
    original = load_file(str(saved["vision"] / "model.safetensors"))
    original = {k.removeprefix("vision_model."): v for k, v in original.items()}
    kept = {k for k in original if k.startswith(("encoder.layers.2.", "post_layernorm."))}  # past the select layer
    assert kept and all(torch.equal(exported[prefix + k], original[k]) for k in kept)
    assert not torch.equal(exported[prefix + "embeddings.patch_embedding.weight"],
                           original["embeddings.patch_embedding.weight"])  # fmt: skip


def test_export_without_the_original_tower_exports_the_trained_layers(saved: dict[str, Any], tmp_path: Path) -> None:
    """With ``from_pretrained`` gone, the stored layers alone give the same features (``vision_feature_layer``)."""
    import json
    import shutil

    from transformers import LlavaForConditionalGeneration

    from neva_tools.export.hf_llava import export_hf_llava

    full = export_hf_llava(saved["nemo"], tmp_path / "full")
    moved = tmp_path / "moved"
    shutil.move(str(saved["vision"]), moved)
    try:
        alone = export_hf_llava(saved["nemo"], tmp_path / "alone")
    finally:
        shutil.move(str(moved), saved["vision"])
    config = json.loads((alone / "config.json").read_text())
    assert config["vision_config"]["num_hidden_layers"] == 2 and config["vision_feature_layer"] == 2
    images = torch.randn(2, 3, 28, 28)
    features = []
    for directory in (full, alone):
        model = LlavaForConditionalGeneration.from_pretrained(str(directory), dtype=torch.float32)
        layer = model.config.vision_feature_layer
        with torch.no_grad():
            features.append(model.model.vision_tower(images, output_hidden_states=True).hidden_states[layer])
    torch.testing.assert_close(features[0], features[1], rtol=0, atol=0)
