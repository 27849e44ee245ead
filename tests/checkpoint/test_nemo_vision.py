"""The vision tower's record in a NeVA ``.nemo`` config: architecture round trip, split kinds, the refusal rule."""

from __future__ import annotations

import pytest
import yaml

from neva_tools.checkpoint import nemo_vision
from neva_tools.errors import NevaError
from neva_tools.mappings.base import Split
from neva_tools.mappings.clip import ClipVisionArch
from neva_tools.mappings.siglip import SiglipVisionArch

CLIP = ClipVisionArch(image_size=336, patch_size=14, hidden_size=1024, num_layers=24, num_heads=16,
                      ffn_hidden_size=4096)  # fmt: skip
SIGLIP = SiglipVisionArch(image_size=384, patch_size=14, hidden_size=1152, num_layers=27, num_heads=16,
                          ffn_hidden_size=4304)  # fmt: skip


@pytest.mark.parametrize("arch", [CLIP, SIGLIP])
def test_arch_record_round_trips_through_yaml(arch: ClipVisionArch) -> None:
    record = yaml.safe_load(yaml.safe_dump(nemo_vision.arch_record(arch)))
    assert record["model_type"] == ("siglip" if isinstance(arch, SiglipVisionArch) else "clip")
    back = nemo_vision.arch_from_record(record, "x.nemo")
    assert back == arch and type(back) is type(arch)


def test_bad_records_name_the_problem() -> None:
    record = nemo_vision.arch_record(CLIP)
    with pytest.raises(NevaError, match=r"x.nemo: vision.arch.model_type is 'eva'"):
        nemo_vision.arch_from_record({**record, "model_type": "eva"}, "x.nemo")
    del record["num_heads"]
    with pytest.raises(NevaError, match=r"missing \['num_heads'\]"):
        nemo_vision.arch_from_record(record, "x.nemo")
    with pytest.raises(NevaError, match=r"vision\.stored is true but vision\.arch is missing"):
        nemo_vision.stored_arch({"vision": {"stored": True}}, "x.nemo")


def test_splits_come_from_the_family_tables() -> None:
    clip = nemo_vision.splits(CLIP, -2)
    assert len([n for n in clip if n.endswith("linear_qkv.weight")]) == 23  # layers up to the select layer
    assert clip["model.vision_model.decoder.layers.0.self_attention.linear_qkv.weight"] is Split.QKV
    assert clip["model.vision_model.decoder.layers.0.mlp.linear_fc2.weight"] is Split.ROW
    assert clip["model.vision_model.class_token"] is Split.REPLICATED
    siglip = nemo_vision.splits(SIGLIP, -1)
    assert "model.vision_model.conv1.bias" in siglip and "model.vision_model.class_token" not in siglip
    cfg = {"mm_cfg": {"vision_encoder": {"vision_select_layer": -1}},
           "vision": {"stored": True, "arch": nemo_vision.arch_record(SIGLIP)}}  # fmt: skip
    assert nemo_vision.stored_splits(cfg, "x.nemo") == siglip
    assert nemo_vision.stored_splits({"mm_cfg": {}, "vision": {}}, "x.nemo") == {}


def test_trained_towers_missing_from_the_file_are_refused() -> None:
    trained = {"mm_cfg": {"vision_encoder": {"freeze": False, "from_pretrained": "/clip"}}}
    with pytest.raises(NevaError, match=r"x.nemo was trained .* untrained tower /clip .* or pass --vision"):
        nemo_vision.check_trained_tower(trained, False, "x.nemo", bypass="pass --vision")
    nemo_vision.check_trained_tower(trained, True, "x.nemo", bypass="pass --vision")  # the file holds it
    nemo_vision.check_trained_tower(trained, False, "x.nemo", bypass=None)  # a tower was given
    frozen = {"mm_cfg": {"vision_encoder": {"freeze": True}}}
    nemo_vision.check_trained_tower(frozen, False, "x.nemo", bypass="pass --vision")
    assert nemo_vision.holds_tower(["model.embedding.word_embeddings.vision_encoder.vision_model.x"])
    assert not nemo_vision.holds_tower(["model.embedding.word_embeddings.weight"])
