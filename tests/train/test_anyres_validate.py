"""``neva config validate`` on AnyRes settings: names, pinpoints against the encoder, the largest image's tokens."""

from __future__ import annotations

from neva_tools.config.load import load_config
from neva_tools.train.validate import check_config

CLIP_336 = "model.mm_cfg.vision_encoder.from_pretrained=ViT-L-14-336-quickgelu:missing.pt"  # 336 px, 14 px patches
ANYRES = ["model.data.image_aspect_ratio=anyres", "model.data.image_grid_pinpoints=[[336,672],[672,336],[672,672]]",
          "model.mm_cfg.mm_patch_merge_type=spatial_unpad"]  # fmt: skip


def _problems(*overrides: str) -> list[str]:
    return check_config(load_config(None, [CLIP_336, *overrides]), offline=True)


def _about_images(problems: list[str]) -> list[str]:
    return [p for p in problems if "image" in p or "merge" in p or "pinpoint" in p]


def test_valid_anyres_config_has_no_image_problem() -> None:
    assert _about_images(_problems(*ANYRES, "model.data.max_seq_length=4096")) == []
    assert _about_images(_problems("model.data.image_aspect_ratio=anyres",
                                   "model.data.image_grid_pinpoints=(1x1),...,(2x2)",
                                   "model.data.max_seq_length=4096")) == []  # fmt: skip


def test_the_largest_image_must_fit_the_sequence() -> None:
    # 672 x 672: 2 x 2 tiles, 48 x 48 features + a newline per row, after the 24 x 24 base view: 576 + 48 x 49
    assert _about_images(_problems(*ANYRES, "model.data.max_seq_length=2048")) == [
        "an image can become 2928 tokens (model.data.image_aspect_ratio anyres, canvases up to [672, 672] px, "
        "model.mm_cfg.mm_patch_merge_type spatial_unpad), not less than model.data.max_seq_length (2048); raise "
        "max_seq_length, use smaller pinpoints or anyres_max_N (shrinks large grids with spatial_unpad)"]  # fmt: skip
    shrunk = [*ANYRES, "model.data.image_aspect_ratio=anyres_max_1", "model.data.max_seq_length=2048"]
    assert _about_images(_problems(*shrunk)) == []  # anyres_max_1: the grid shrinks to about one tile's features


def test_anyres_settings_are_checked_by_name() -> None:
    assert any("needs model.data.image_grid_pinpoints" in p for p in _problems("model.data.image_aspect_ratio=anyres"))
    assert any("model.data.image_aspect_ratio (anyres_max_x) is not one of square, pad, anyres, anyres_max_N" in p
               for p in _problems("model.data.image_aspect_ratio=anyres_max_x"))  # fmt: skip
    assert any("mm_patch_merge_type (unpad) is not one of flat, spatial, spatial_unpad" in p
               for p in _problems("model.mm_cfg.mm_patch_merge_type=unpad"))  # fmt: skip
    wrong = _problems(*ANYRES, "model.data.image_grid_pinpoints=[[336,600]]", "model.data.max_seq_length=4096")
    assert _about_images(wrong) == ["model.data.image_grid_pinpoints: [336, 600] must be positive multiples of the "
                                    "vision encoder's image size (336): every canvas is cut into whole 336px "
                                    "tiles"]  # fmt: skip
