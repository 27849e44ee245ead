"""LLaVA-NeXT's AnyRes: an image as a base view plus a grid of encoder-sized tiles, and where their features go.

Data side (``model.data.image_aspect_ratio: anyres | anyres_max_N``, ``model.data.image_grid_pinpoints``): the
best canvas among the pinpoints is chosen for the image's size (most of the image's pixels kept, then least canvas
wasted); the image is resized to fit the canvas with its aspect ratio (bicubic) and centred on black; the canvas is
cut into ``image_size`` tiles, row by row; the base view (the whole image squashed to ``image_size``) goes first.
This is LLaVA-NeXT's ``process_anyres_image`` and transformers' ``LlavaNextImageProcessor`` (PIL backend).
A sample with several images is not tiled: each image is one padded view (LLaVA-NeXT's training,
transformers' LLaVA-OneVision processor).

Model side (``model.mm_cfg.mm_patch_merge_type``), for an image of several tiles, after the projector:

* ``flat``: the tiles' features one after the other, base first (megatron-core's ``num_image_tiles``);
* ``spatial``: base, then the tile grid's features row by row across tiles (``rows·side × cols·side``);
* ``spatial_unpad``: base, then the grid with the padding rows/columns cut away (the image's aspect ratio), with a
  learned ``image_newline`` row appended to every feature row: transformers' ``LlavaNextModel.pack_image_features``.
  With ``anyres_max_N`` a grid larger than ``N`` tiles' worth of features is first shrunk by bilinear
  interpolation (LLaVA-OneVision's ``pack_image_features``). A one-tile image gets one ``image_newline``.

Pinpoints are ``[height, width]`` pixel pairs (transformers' order; LLaVA's ``--image_grid_pinpoints`` lists are
``(width, height)``: ``scripts/llava_train.py`` swaps them). The range form ``"(1x1),...,(6x6)"`` is LLaVA-NeXT's:
``(AxB)`` counts tiles as width × height, every grid from the first to the last is a candidate, in LLaVA-NeXT's
order (so ties resolve as there), in multiples of the encoder's image size.

:meth:`ImageLayout.tokens` is the one count of the embeddings an image becomes; dataset length checks, packing,
``neva data validate``, the config checks, inference and the model all use it (via
:func:`sample_image_tokens` for a sample's images).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from neva_tools.errors import NevaError

#: ``model.mm_cfg.mm_patch_merge_type`` values.
MERGE_TYPES = ("flat", "spatial", "spatial_unpad")
#: ``model.data.image_aspect_ratio`` values (``anyres_max_N`` with any N ≥ 1).
ASPECTS = ("square", "pad", "anyres", "anyres_max_N")
PINPOINTS_KEY = "model.data.image_grid_pinpoints"
_MAX = re.compile(r"anyres_max_(\d+)")
_GRID = re.compile(r"\(\s*(\d+)\s*x\s*(\d+)\s*\)")
_RANGE = re.compile(r"\s*\(\s*\d+\s*x\s*\d+\s*\)\s*,\s*\.\.\.\s*,\s*\(\s*\d+\s*x\s*\d+\s*\)\s*")


def parse_aspect(aspect: str) -> tuple[str, int | None]:
    """(``square`` | ``pad`` | ``anyres``, N of ``anyres_max_N`` or None); anything else is an error."""
    aspect = str(aspect)
    if aspect in ("square", "pad", "anyres"):
        return aspect, None
    match = _MAX.fullmatch(aspect)
    if match and int(match.group(1)) >= 1:
        return "anyres", int(match.group(1))
    raise NevaError(f"image_aspect_ratio {aspect!r} is not one of {', '.join(ASPECTS)} (N: a positive integer)")


def parse_pinpoints(value: Any, image_size: int, key: str = PINPOINTS_KEY) -> tuple[tuple[int, int], ...]:
    """Candidate canvases ``((height, width), ...)`` in pixels from a list of pairs or the range form (module doc)."""
    if value is None or (not isinstance(value, str) and len(value) == 0):
        return ()
    if isinstance(value, str):
        if not _RANGE.fullmatch(value):
            hint = ""
            pairs = re.findall(r"\(\s*(\d+)\s*,\s*(\d+)\s*\)", value)
            if pairs:  # LLaVA's "[(384, 768), ...]": (width, height)
                hint = f"; LLaVA's list of (width, height) is {key}=[{','.join(f'[{h},{w}]' for w, h in pairs)}]"
            raise NevaError(f"{key} ({value!r}) must be a list of [height, width] pixel pairs or LLaVA-NeXT's "
                            f"range \"(1x1),...,(6x6)\" (tiles as width x height, from the first grid to the "
                            f"last){hint}")  # fmt: skip
        (w0, h0), (w1, h1) = ((int(a), int(b)) for a, b in _GRID.findall(value))
        if not (1 <= w0 <= w1 and 1 <= h0 <= h1):
            raise NevaError(f"{key} ({value!r}): the first grid must be at least 1x1 and not larger than the last")
        return tuple((h * image_size, w * image_size) for w in range(w0, w1 + 1) for h in range(h0, h1 + 1))
    pairs = []
    for pair in value:
        if isinstance(pair, str) or not hasattr(pair, "__len__") or len(pair) != 2:
            raise NevaError(f"{key}: {pair!r} is not a [height, width] pair (value {list(value)!r})")
        try:
            h, w = (int(x) for x in pair)
        except (TypeError, ValueError):
            raise NevaError(f"{key}: {list(pair)!r} is not a pair of integers") from None
        if h < 1 or w < 1 or h % image_size or w % image_size:
            raise NevaError(f"{key}: [{h}, {w}] must be positive multiples of the vision encoder's image size "
                            f"({image_size}): every canvas is cut into whole {image_size}px tiles")  # fmt: skip
        pairs.append((h, w))
    return tuple(pairs)


def select_best_resolution(height: int, width: int, pinpoints: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The pinpoint ``(height, width)`` that keeps most of the image's pixels when fitted, then wastes least canvas;
    the first such in order (LLaVA-NeXT's and transformers' ``select_best_resolution``)."""
    best, kept_best, waste_best = None, 0, math.inf
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = ph * pw - kept
        if kept > kept_best or (kept == kept_best and waste < waste_best):
            best, kept_best, waste_best = (ph, pw), kept, waste
    if best is None:
        raise NevaError(f"no pinpoint fits a {width}x{height} image (pinpoints {list(pinpoints)})")
    return best


def fit_within(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """(height, width) of the image resized into ``target`` with its aspect ratio (one side fills it)."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def unpad_bounds(height: int, width: int, rows: int, cols: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a ``rows × cols`` feature map of a centred, padded ``height × width`` image
    without its padding (transformers' ``unpad_image``: the same rounding and the same odd-padding rule)."""
    if width / height > cols / rows:
        new = int(round(height * (cols / width), 7))
        pad = (rows - new) // 2
        return pad, rows - pad, 0, cols
    new = int(round(width * (rows / height), 7))
    pad = (cols - new) // 2
    return 0, rows, pad, cols - pad


@dataclass(frozen=True)
class Unpadded:
    """Where an image's grid features go with ``spatial_unpad``: the tile grid, the crop of the ``rows·side ×
    cols·side`` feature map, and the size it is interpolated to (``anyres_max_N``; None: kept)."""

    rows: int
    cols: int
    crop: tuple[int, int, int, int]  # top, bottom, left, right
    resize: tuple[int, int] | None

    @property
    def shape(self) -> tuple[int, int]:
        """Feature rows and columns after the crop and the interpolation (before the newline column)."""
        top, bottom, left, right = self.crop
        return self.resize or (bottom - top, right - left)


@dataclass(frozen=True)
class ImageLayout:
    """How images become tiles and tiles become LLM embeddings (see the module docstring)."""

    image_size: int  # the vision encoder's input size: one tile
    patch_size: int
    aspect: str = "pad"
    pinpoints: tuple[tuple[int, int], ...] = ()  # (height, width) canvases in pixels
    merge: str = "flat"

    def __post_init__(self) -> None:
        mode, limit = parse_aspect(self.aspect)
        if self.merge not in MERGE_TYPES:
            raise NevaError(f"model.mm_cfg.mm_patch_merge_type ({self.merge}) is not one of {', '.join(MERGE_TYPES)}")
        if self.image_size < self.patch_size or self.patch_size < 1:
            raise NevaError(f"image size ({self.image_size}) must be at least the patch size ({self.patch_size})")
        if mode == "anyres" and not self.pinpoints:
            raise NevaError(f"model.data.image_aspect_ratio {self.aspect} needs {PINPOINTS_KEY}: the canvases "
                            "images are tiled on, e.g. \"(1x1),...,(3x3)\" (multiples of the encoder's image "
                            "size)")  # fmt: skip
        if limit is not None and self.merge != "spatial_unpad":
            raise NevaError(f"model.data.image_aspect_ratio {self.aspect} shrinks large tile grids only with "
                            f"model.mm_cfg.mm_patch_merge_type spatial_unpad (found {self.merge}); set it, or use "
                            "anyres")  # fmt: skip
        bad = [p for p in self.pinpoints if p[0] % self.image_size or p[1] % self.image_size or min(p) < 1]
        if bad:
            raise NevaError(f"{PINPOINTS_KEY}: {[list(p) for p in bad]} are not positive multiples of the vision "
                            f"encoder's image size ({self.image_size})")  # fmt: skip

    @classmethod
    def from_config(cls, data: Mapping[str, Any] | None, mm_cfg: Mapping[str, Any] | None, image_size: int,
                    patch_size: int) -> ImageLayout:  # fmt: skip
        """The layout of ``model.data`` / ``model.mm_cfg`` (a DictConfig or a saved .nemo config's dicts)."""
        data, mm_cfg = data or {}, mm_cfg or {}
        aspect = str(data.get("image_aspect_ratio") or "pad")
        pinpoints = parse_pinpoints(data.get("image_grid_pinpoints"), image_size)
        return cls(image_size, patch_size, aspect, pinpoints, str(mm_cfg.get("mm_patch_merge_type") or "flat"))

    @property
    def tiled(self) -> bool:
        """Whether single images are tiled (``anyres``, ``anyres_max_N``)."""
        return parse_aspect(self.aspect)[0] == "anyres"

    @property
    def max_tiles(self) -> int | None:
        """N of ``anyres_max_N``: larger grids are shrunk to about N tiles' worth of features."""
        return parse_aspect(self.aspect)[1]

    @property
    def side(self) -> int:
        """Features per tile side (a convolution of ``patch_size`` stride drops any remainder)."""
        return self.image_size // self.patch_size

    def tiles_images(self, count: int) -> bool:
        """Whether the images of a sample holding ``count`` images are tiled: only a single image is."""
        return self.tiled and count == 1

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of tiles of a ``height × width`` image."""
        ph, pw = select_best_resolution(height, width, self.pinpoints)
        return ph // self.image_size, pw // self.image_size

    def num_tiles(self, height: int, width: int, tiled: bool = True) -> int:
        """Tiles the vision encoder sees for the image: the base view and the grid, or one view."""
        if not tiled:
            return 1
        rows, cols = self.grid(height, width)
        return 1 + rows * cols

    def unpadded(self, height: int, width: int) -> Unpadded:
        """The ``spatial_unpad`` placement of a tiled image's grid features."""
        rows, cols = self.grid(height, width)
        crop = unpad_bounds(height, width, rows * self.side, cols * self.side)
        top, bottom, left, right = crop
        return Unpadded(rows, cols, crop, self._shrink(bottom - top, right - left))

    def _shrink(self, h: int, w: int) -> tuple[int, int] | None:
        """The size ``anyres_max_N`` interpolates an unpadded ``h × w`` feature map to (None: kept)."""
        if self.max_tiles is None:
            return None
        ratio = math.sqrt(h * w / (self.max_tiles * self.side**2))
        return (int(h // ratio), int(w // ratio)) if ratio > 1.1 else None  # LLaVA-OneVision's tolerance

    def tokens(self, height: int = 0, width: int = 0, tiled: bool = True) -> int:
        """Embeddings a ``height × width`` image becomes in the LLM's sequence (the size matters only when tiled)."""
        base = self.side**2
        if not tiled:
            return base + int(self.merge == "spatial_unpad")
        if self.merge != "spatial_unpad":
            return base * self.num_tiles(height, width)
        rows, cols = self.unpadded(height, width).shape
        return base + rows * (cols + 1)

    def max_tokens(self) -> int:
        """The most embeddings one image can become (one view when untiled). With ``spatial_unpad`` a bound: the
        largest over every pinpoint's grid and every crop :func:`unpad_bounds` can cut from it (whether or not an
        image of that shape selects that grid). Under ``anyres_max_N`` it is not the full grid: a padded image whose
        crop stays within the 1.1 tolerance keeps more features than a full grid, which is shrunk."""
        counts = [self.tokens(tiled=False)]
        for ph, pw in self.pinpoints if self.tiled else ():
            rows, cols = ph // self.image_size, pw // self.image_size
            if self.merge != "spatial_unpad":
                counts.append(self.side**2 * (1 + rows * cols))
                continue
            r, c = rows * self.side, cols * self.side
            crops = {(r - 2 * ((r - n) // 2), c) for n in range(r + 1)}  # rows cut (wide images)
            crops |= {(r, c - 2 * ((c - n) // 2)) for n in range(c + 1)}  # columns cut (tall images)
            for h, w in crops:
                h, w = self._shrink(h, w) or (h, w)
                counts.append(self.side**2 + h * (w + 1))
        return max(counts)


def sample_image_tokens(layout: ImageLayout, sizes: Sequence[tuple[int, int] | None]) -> list[int]:
    """Embeddings each image of one sample becomes; ``sizes`` are (height, width), needed (not None) only when
    :meth:`ImageLayout.tiles_images` says the sample's images are tiled."""
    tiled = layout.tiles_images(len(sizes))
    counts = []
    for size in sizes:
        if tiled and size is None:
            raise NevaError("the image size is needed to count the tokens of a tiled (anyres) image")
        counts.append(layout.tokens(*(size or (0, 0)), tiled=tiled))
    return counts


def tile_views(img: Image.Image, layout: ImageLayout) -> list[Image.Image]:
    """The base view and the tiles (row by row) of an RGB image, each ``image_size`` square (module docstring)."""
    size = layout.image_size
    ph, pw = select_best_resolution(img.height, img.width, layout.pinpoints)
    nh, nw = fit_within(img.height, img.width, ph, pw)
    canvas = Image.new("RGB", (pw, ph), (0, 0, 0))
    canvas.paste(img.resize((nw, nh), Image.Resampling.BICUBIC), ((pw - nw) // 2, (ph - nh) // 2))
    tiles = [canvas.crop((x, y, x + size, y + size)) for y in range(0, ph, size) for x in range(0, pw, size)]
    return [img.resize((size, size), Image.Resampling.BICUBIC), *tiles]
