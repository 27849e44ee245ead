"""The Hugging Face LLaVA class of a NeVA config, and where each part's tensors live in both checkpoint layouts."""

from __future__ import annotations

import pytest

from neva_tools.errors import NevaError
from neva_tools.mappings.llava_hf import FORMATS, choose_format, locate, select_strategy


@pytest.mark.parametrize(("aspect", "merge", "expected"), [
    ("pad", "flat", "llava"),
    ("square", "flat", "llava"),
    ("pad", "spatial", "llava"),  # one view: spatial lays it out flat
    ("anyres", "spatial_unpad", "llava_next"),
    ("anyres_max_9", "spatial_unpad", "llava_onevision"),
])  # fmt: skip
def test_class_follows_aspect_and_merge(aspect: str, merge: str, expected: str) -> None:
    assert choose_format(aspect, merge, "m.nemo").name == expected
    assert choose_format(aspect, merge, "m.nemo", expected).name == expected


@pytest.mark.parametrize(("aspect", "merge", "requested", "message"), [
    ("anyres", "flat", "auto", r"mm_patch_merge_type flat; .* spatial_unpad only"),
    ("anyres", "spatial", "auto", r"mm_patch_merge_type spatial; .* spatial_unpad only"),
    ("pad", "spatial_unpad", "auto", r"no Hugging Face LLaVA class lays images out so"),
    ("anyres", "spatial_unpad", "llava_onevision", r"its class is LlavaNextForConditionalGeneration"),
    ("pad", "flat", "llava_next", r"--format llava_next cannot run m\.nemo \(image_aspect_ratio pad"),
    ("pad", "flat", "next", r"--format 'next' is not one of auto, llava, llava_next, llava_onevision"),
])  # fmt: skip
def test_unrunnable_layouts_are_refused(aspect: str, merge: str, requested: str, message: str) -> None:
    with pytest.raises(NevaError, match=message):
        choose_format(aspect, merge, "m.nemo", requested)


def test_both_layouts_locate_the_same_parts() -> None:
    pairs = [
        ("language_model.model.layers.0.mlp.up_proj.weight", "model.language_model.layers.0.mlp.up_proj.weight"),
        ("language_model.lm_head.weight", "lm_head.weight"),
        ("vision_tower.vision_model.encoder.layers.0.mlp.fc1.bias", "model.vision_tower.encoder.layers.0.mlp.fc1.bias"),
        ("multi_modal_projector.linear_1.bias", "model.multi_modal_projector.linear_1.bias"),
        ("image_newline", "model.image_newline"),
    ]  # fmt: skip
    for v4, v5 in pairs:
        assert locate(v4) == locate(v5) is not None
    assert locate("image_newline") == ("projector", "image_newline")
    assert locate("language_model.model.norm.weight") == ("llm", "model.norm.weight")
    assert locate("image_newline_extra") is None and locate("text_model.x") is None
    assert select_strategy("clip") == "default" and select_strategy("siglip") == "full"
    assert [f.tiled for f in FORMATS.values()] == [False, True, True]
