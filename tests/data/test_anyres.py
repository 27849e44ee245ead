"""AnyRes data side: pinpoints, best-canvas choice, tiles equal transformers' LLaVA-NeXT processor, one token count."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from neva_tools.data.anyres import (
    ImageLayout,
    parse_aspect,
    parse_pinpoints,
    sample_image_tokens,
    select_best_resolution,
)
from neva_tools.data.dataset import NevaDataset, PackedNevaDataset, collate
from neva_tools.data.images import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD, ImageProcessor
from neva_tools.data.registry import DatasetSpec, DatasetUse
from neva_tools.data.templates import IMAGE_TOKEN_INDEX
from neva_tools.data.validate import Settings, validate
from neva_tools.errors import NevaError

SIZE, PATCH = 28, 7
LIST = [[28, 56], [56, 28], [56, 56], [28, 84], [84, 28]]  # [height, width]
RANGE = "(1x1),...,(3x3)"
#: (width, height) of test images: wide, tall, square, tiny, very wide, very tall, odd sizes.
SIZES = [(60, 30), (30, 61), (50, 50), (9, 12), (170, 20), (17, 90), (101, 41)]


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + width * 1000 + height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _layout(pinpoints: object, merge: str = "spatial_unpad", aspect: str = "anyres") -> ImageLayout:
    return ImageLayout(SIZE, PATCH, aspect, parse_pinpoints(pinpoints, SIZE), merge)


def test_pinpoint_forms() -> None:
    # LLaVA-NeXT's range: (AxB) is width x height, i over widths outer, j over heights inner, times the image size
    assert parse_pinpoints("(1x1),...,(2x3)", 10) == ((10, 10), (20, 10), (30, 10), (10, 20), (20, 20), (30, 20))
    assert parse_pinpoints(" (1x1), ..., (6x6) ", 384)[-1] == (2304, 2304)
    assert len(parse_pinpoints("(1x1),...,(6x6)", 384)) == 36
    assert parse_pinpoints([[28, 56], (56, 28)], SIZE) == ((28, 56), (56, 28))
    assert parse_pinpoints(None, SIZE) == () == parse_pinpoints([], SIZE)
    with pytest.raises(NevaError, match=r"LLaVA's list of \(width, height\) is .*=\[\[768,384\],\[384,768\]\]"):
        parse_pinpoints("[(384, 768), (768, 384)]", 384)
    with pytest.raises(NevaError, match=r"must be positive multiples of the vision encoder's image size \(28\)"):
        parse_pinpoints([[28, 50]], SIZE)
    with pytest.raises(NevaError, match="range"):
        parse_pinpoints("(1x1),(2x2)", SIZE)  # LLaVA-NeXT would read it as a range: say how to write it
    assert parse_aspect("anyres_max_9") == ("anyres", 9) and parse_aspect("pad") == ("pad", None)
    with pytest.raises(NevaError, match="is not one of square, pad, anyres, anyres_max_N"):
        parse_aspect("anyres_max_0")
    with pytest.raises(NevaError, match=r"needs model\.data\.image_grid_pinpoints"):
        ImageLayout(SIZE, PATCH, "anyres")
    with pytest.raises(NevaError, match=r"only with model\.mm_cfg\.mm_patch_merge_type spatial_unpad"):
        ImageLayout(SIZE, PATCH, "anyres_max_4", ((28, 56),), "flat")


def test_best_resolution_equals_transformers() -> None:
    from transformers.image_processing_utils import select_best_resolution as theirs

    for pinpoints in (LIST, [list(p) for p in parse_pinpoints("(1x1),...,(6x6)", 384)]):
        for height in (1, 7, 100, 333, 384, 500, 777, 1000, 2400, 3000):
            for width in (1, 9, 100, 384, 512, 768, 1000, 1999, 4000):
                assert select_best_resolution(height, width, pinpoints) == theirs((height, width), pinpoints)


@pytest.mark.parametrize("pinpoints", [LIST, RANGE], ids=["list", "range"])
@pytest.mark.parametrize(("width", "height"), SIZES)
def test_tiles_equal_transformers_llava_next(pinpoints: object, width: int, height: int) -> None:
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    layout = _layout(pinpoints)
    ours = ImageProcessor(SIZE, "anyres", CLIP_MEAN, CLIP_STD, layout).views(_image(width, height), tiled=True)
    flat = [list(p) for p in layout.pinpoints]
    hf = LlavaNextImageProcessorPil(size={"height": SIZE, "width": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                                    do_center_crop=False, image_grid_pinpoints=flat, image_mean=list(CLIP_MEAN),
                                    image_std=list(CLIP_STD), do_pad=False)  # fmt: skip
    out = hf(_image(width, height), return_tensors=None)
    theirs = torch.from_numpy(np.asarray(out["pixel_values"][0]))
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert layout.grid(height, width) == tuple(get_anyres_image_grid_shape((height, width), flat, SIZE))
    assert len(ours) == layout.num_tiles(height, width)


@pytest.mark.parametrize(("width", "height"), [(60, 30), (17, 90)])
def test_siglip_tiles_equal_transformers_llava_onevision(width: int, height: int) -> None:
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    layout = _layout("(1x1),...,(3x3)", aspect="anyres_max_4")
    ours = ImageProcessor(SIZE, layout.aspect, SIGLIP_MEAN, SIGLIP_STD, layout).views(_image(width, height), tiled=True)
    hf = LlavaOnevisionImageProcessorPil(size={"height": SIZE, "width": SIZE},
                                         image_grid_pinpoints=[list(p) for p in layout.pinpoints],
                                         image_mean=list(SIGLIP_MEAN), image_std=list(SIGLIP_STD),
                                         do_pad=False)  # fmt: skip
    theirs = torch.from_numpy(np.asarray(hf(_image(width, height), return_tensors=None)["pixel_values"][0]))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_token_counts() -> None:
    layout = _layout(LIST)
    side = SIZE // PATCH  # 4 features per tile side, 16 per tile
    # 60 wide x 30 high: 28x56 (h x w) keeps 56x28 px as 56x56 and 28x84 do, with the least canvas: 1 x 2 tiles;
    # it fills the canvas (56/60 = 28/30), so the 4 x 8 feature grid keeps every row: 16 + 4 rows x (8 + newline)
    assert layout.grid(30, 60) == (1, 2) and layout.unpadded(30, 60).crop == (0, 4, 0, 8)
    assert layout.tokens(30, 60) == side**2 + 4 * (8 + 1) == 52
    # 30 wide x 61 high: 84x28 keeps it at 28x57 (the most pixels): 3 x 1 tiles, a 12 x 4 grid; the image covers
    # round(61 x 4 / 30) = 8 feature rows, (12 - 8) / 2 = 2 padding rows cut on each side
    assert layout.grid(61, 30) == (3, 1) and layout.unpadded(61, 30).crop == (2, 10, 0, 4)
    assert layout.tokens(61, 30) == side**2 + 8 * (4 + 1)
    assert _layout(LIST, "flat").tokens(30, 60) == 3 * side**2 == _layout(LIST, "spatial").tokens(30, 60)
    assert layout.tokens(tiled=False) == side**2 + 1 and _layout(LIST, "flat").tokens(tiled=False) == side**2
    # a sample with several images is not tiled (LLaVA-NeXT's training); one image is
    assert sample_image_tokens(layout, [None, None]) == [17, 17]
    assert sample_image_tokens(layout, [(30, 60)]) == [layout.tokens(30, 60)]
    with pytest.raises(NevaError, match="image size is needed"):
        sample_image_tokens(layout, [None])
    big = _layout("(1x1),...,(6x6)", aspect="anyres_max_2")  # grids beyond 2 tiles' features shrink
    plan = big.unpadded(168, 168)  # 6 x 6 tiles, 24 x 24 features: ratio sqrt(576 / 32) = 4.24 -> 5 x 5
    assert (plan.rows, plan.cols, plan.resize) == (6, 6, (5, 5)) and big.tokens(168, 168) == 16 + 5 * 6
    assert big.unpadded(28, 28).resize is None  # 16 features <= 1.1 x 2 tiles' worth: kept
    assert big.max_tokens() >= big.tokens(168, 168) > big.tokens(tiled=False)


def _records(root: Path) -> tuple[Path, Path]:
    """A dataset of differently shaped images: one image per record, and one record with two images."""
    images = root / "images"
    images.mkdir(parents=True)
    records = []
    for i, (w, h) in enumerate([(60, 30), (30, 61), (50, 50), (101, 41)]):
        _image(w, h, i).save(images / f"{i}.png")
        records.append({"id": f"r{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."},
            {"from": "gpt", "value": "A red circle on the left."}]})  # fmt: skip
    records.append({"id": "two", "images": ["0.png", "1.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nDescribe the images."},
        {"from": "gpt", "value": "A blue square on the top."}]})  # fmt: skip
    path = root / "data.json"
    path.write_text(json.dumps(records))
    return path, images


def _dataset(shapes: dict, root: Path, layout: ImageLayout, **kwargs: object) -> NevaDataset:
    path, images = _records(root)
    use = DatasetUse(DatasetSpec("anyres", path, images, "vicuna_v1"))
    processor = ImageProcessor(SIZE, layout.aspect, layout=layout)
    return NevaDataset([use], shapes["tokenizer"], processor, image_tokens=16, **kwargs)


def test_dataset_items_tiles_and_counts(shapes: dict, tmp_path: Path) -> None:
    layout = _layout(LIST)
    ds = _dataset(shapes, tmp_path, layout)
    for i in range(len(ds)):
        item = ds[i]
        sizes = [tuple(s) for s in item["image_sizes"].tolist()]
        assert item["images"].shape[0] == int(item["num_image_tiles"].sum())
        assert item["image_tokens"].tolist() == sample_image_tokens(layout, sizes) == ds.image_token_counts(i)
        ids = item["input_ids"]
        assert ds.length(i) == len(ids) + int(item["image_tokens"].sum()) - int((ids == IMAGE_TOKEN_INDEX).sum())
    assert ds[0]["num_image_tiles"].tolist() == [3] and ds[0]["image_sizes"].tolist() == [[30, 60]]  # base + 1x2
    assert ds[4]["num_image_tiles"].tolist() == [1, 1] and ds[4]["image_tokens"].tolist() == [17, 17]
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch["num_image_tiles"].tolist() == [3, 4, 5, 4, 1, 1]
    assert batch["images"].shape[0] == 18 and len(batch["image_tokens"]) == 6


def test_too_long_counts_the_tiles(shapes: dict, tmp_path: Path) -> None:
    one_view = ImageLayout(SIZE, PATCH)  # one 16-token view per image
    fits = _dataset(shapes, tmp_path / "a", one_view).length(0) + 1  # the unshifted sequence, exactly
    _dataset(shapes, tmp_path / "b", one_view, max_seq_length=fits).tokenize(0)
    tiled = _dataset(shapes, tmp_path / "c", _layout(LIST, "flat"), max_seq_length=fits)  # 3 tiles of 16
    too_long = rf"id r0\): {fits + 32} tokens after image expansion, more than max_seq_length"
    with pytest.raises(NevaError, match=too_long):
        tiled.tokenize(0)


def test_packing_and_validate_use_the_same_counts(shapes: dict, tmp_path: Path) -> None:
    layout = _layout(LIST)
    ds = _dataset(shapes, tmp_path, layout)
    lengths = [ds.length(i) for i in range(len(ds))]
    packed = PackedNevaDataset(ds, max(lengths) + 40)
    assert sorted(packed.plan.lengths) == sorted(lengths)
    row = packed[0]
    members = packed.plan.bins[0]
    assert row["image_tokens"].tolist() == [c for i in members for c in ds.image_token_counts(i)]
    assert row["images"].shape[0] == int(row["num_image_tiles"].sum())
    settings = Settings(image_folder=str(tmp_path / "images"), tokenizer=str(shapes["tokenizer"]),
                        template="vicuna_v1", layout=layout)  # fmt: skip
    report = validate([tmp_path / "data.json"], settings)
    assert report.ok and sorted(report.lengths) == sorted(n + 1 for n in lengths)  # validate counts unshifted ids
    plain = validate([tmp_path / "data.json"], Settings(image_folder=str(tmp_path / "images"),
                                                        tokenizer=str(shapes["tokenizer"]), template="vicuna_v1",
                                                        image_tokens=16))  # fmt: skip
    assert sorted(plain.lengths) != sorted(report.lengths)


def test_data_cli_counts_tiles(shapes: dict, capsys: pytest.CaptureFixture[str]) -> None:
    """``neva data validate`` / ``pack`` take the training keys as flags; 64 x 64 images tile 2 x 2 with anyres."""
    from neva_tools.cli.main import main

    args = ["data", "validate", str(shapes["finetune"]), "--image-folder", str(shapes["images"]), "--tokenizer",
            str(shapes["tokenizer"]), "--template", "vicuna_v1", "--image-size", "28", "--patch-size", "7",
            "--no-progress", "--json"]  # fmt: skip
    anyres = ["--image-aspect-ratio", "anyres", "--image-grid-pinpoints", "[[28,56],[56,28],[56,56]]",
              "--mm-patch-merge-type", "spatial_unpad"]  # fmt: skip
    assert main(args) == 0
    longest = json.loads(capsys.readouterr().out)["token_length"]["max"]
    assert main([*args, *anyres, "--max-seq-length", str(longest)]) == 1  # 16 + 8 rows x (8 + 1) = 88, not 16
    report = json.loads(capsys.readouterr().out)
    assert report["token_length"]["max"] == longest - 16 + 88 and set(report["invalid_by_kind"]) == {"too_long"}
    assert main([*args, "--max-seq-length", str(longest)]) == 0
    capsys.readouterr()
    assert main([*args, *anyres, "--image-tokens", "16"]) == 2  # a fixed count per image contradicts tiles
    assert "counts them per image: drop --image-tokens" in capsys.readouterr().err
    pack = ["data", "pack", str(shapes["finetune"]), "--image-folder", str(shapes["images"]), "--tokenizer",
            str(shapes["tokenizer"]), "--template", "vicuna_v1", "--image-size", "28", "--patch-size", "7",
            "--max-seq-length", str(longest + 72), "--no-progress", *anyres]  # fmt: skip
    assert main(pack) == 0
    assert "24 samples" in capsys.readouterr().out
