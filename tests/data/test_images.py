"""Image preprocessing: CLIP normalisation, square and pad modes, token counts, decode errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from neva_tools.data.images import CLIP_MEAN, CLIP_STD, ImageProcessor, image_token_count
from neva_tools.errors import NevaError


def test_token_counts() -> None:
    assert image_token_count(224, 14) == 256 and image_token_count(336, 14) == 576
    assert image_token_count(336, 14, class_token=True) == 577
    assert image_token_count(384, 14) == 729  # SigLIP so400m: the convolution drops the last 6 pixels
    with pytest.raises(NevaError, match=r"image size \(10\) must be at least the patch size \(14\)"):
        image_token_count(10, 14)


def test_square_resize_and_normalisation(tmp_path: Path) -> None:
    path = tmp_path / "red.png"
    Image.new("RGB", (40, 20), (255, 0, 0)).save(path)
    out = ImageProcessor(image_size=28, aspect="square")(path)
    assert out.shape == (3, 28, 28)
    expected = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(out[:, 14, 14], expected, atol=1e-5)


def test_pad_mode_pads_with_mean_colour(tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    Image.new("RGB", (40, 20), (255, 0, 0)).save(path)
    out = ImageProcessor(image_size=40, aspect="pad")(path)
    corner, centre = out[:, 0, 0], out[:, 20, 20]
    fill = torch.tensor([int(c * 255) for c in CLIP_MEAN]) / 255.0
    assert torch.allclose(corner, (fill - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD), atol=1e-5)
    assert centre[0] > 1.5  # red stays in the middle band


def test_missing_and_corrupt_images(tmp_path: Path) -> None:
    proc = ImageProcessor(image_size=28)
    with pytest.raises(NevaError, match="does not exist"):
        proc(tmp_path / "missing.png")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(NevaError, match=r"bad\.jpg cannot be decoded"):
        proc(bad)
    with pytest.raises(NevaError, match="image_aspect_ratio 'crop' is not one of square, pad"):
        ImageProcessor(aspect="crop")
