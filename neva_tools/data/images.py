"""Image preprocessing: ``square`` (resize, no crop), ``pad`` (LLaVA-1.5 expand-to-square) or ``anyres`` /
``anyres_max_N`` (LLaVA-NeXT's base view + tiles, :mod:`neva_tools.data.anyres`), then the vision encoder's
normalisation (CLIP's or SigLIP's, see :meth:`ImageProcessor.for_encoder`)."""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image, UnidentifiedImageError

from neva_tools.data.anyres import ASPECTS, ImageLayout, parse_aspect, sample_image_tokens, tile_views
from neva_tools.errors import NevaError

#: OpenAI CLIP's normalisation (open_clip ``OPENAI_DATASET_MEAN/STD``, HF ``CLIPImageProcessor``).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: SigLIP's normalisation to [-1, 1] (HF ``SiglipImageProcessor``, open_clip/timm SigLIP ``INCEPTION_MEAN/STD``).
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
#: megatron-core ``vision_model_type`` → (mean, std).
NORMALIZATION = {"clip": (CLIP_MEAN, CLIP_STD), "siglip": (SIGLIP_MEAN, SIGLIP_STD)}
ASPECT_MODES = ("square", "pad")  # one view per image; anyres/anyres_max_N tile (neva_tools.data.anyres)
#: Largest image accepted, in pixels (PIL's decompression-bomb threshold): a larger one is an error naming it, checked
#: from the header before anything is decoded.
MAX_PIXELS = 89_478_485
#: What PIL raises on a corrupt, truncated or hostile image file.
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error,
                  Image.DecompressionBombError)  # fmt: skip


def image_token_count(image_size: int, patch_size: int, class_token: bool = False) -> int:
    """Embeddings one image expands to: ⌊size / patch⌋² (+1 with the class token).

    224/14 → 256, 336/14 → 576; SigLIP so400m's 384/14 → 729 (its patch convolution drops the last 6 pixels).
    """
    if image_size < patch_size or patch_size < 1:
        raise NevaError(f"image size ({image_size}) must be at least the patch size ({patch_size})")
    return (image_size // patch_size) ** 2 + int(class_token)


@dataclass
class ImageBatch:
    """The images of one sample (or prompt) as the model takes them: tiles, tiles per image, sizes, token counts."""

    pixels: torch.Tensor  # [tiles, 3, size, size], each image's tiles in order (base view first when tiled)
    tiles: torch.Tensor  # [n] int32: tiles of each image (megatron-core's num_image_tiles)
    sizes: torch.Tensor  # [n, 2] int64: each image's (height, width) before processing
    tokens: torch.Tensor | None  # [n] int64: embeddings each image becomes (None: the processor has no layout)

    def __len__(self) -> int:
        return len(self.tiles)

    def fields(self) -> dict[str, torch.Tensor]:
        """The batch keys of ``neva_tools.data.dataset`` (``images``, ``num_image_tiles``, ``image_sizes``,
        ``image_tokens`` when counted)."""
        out = {"images": self.pixels, "num_image_tiles": self.tiles, "image_sizes": self.sizes}
        if self.tokens is not None:
            out["image_tokens"] = self.tokens
        return out


def image_size_of(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image file from its header (no decoding); a missing or unreadable file is an error."""
    try:
        with Image.open(path) as img:
            _check_pixels(img, path)
            return img.height, img.width
    except FileNotFoundError:
        raise NevaError(f"image {path} does not exist") from None
    except _DECODE_ERRORS as exc:
        raise NevaError(f"image {path} cannot be decoded ({exc})") from None


def _check_pixels(img: Image.Image, path: str | os.PathLike) -> None:
    if img.width * img.height > MAX_PIXELS:
        raise NevaError(f"image {path} is {img.width}×{img.height} = {img.width * img.height} pixels, above the "
                        f"limit of {MAX_PIXELS} (a decompression bomb, or an image to downscale first)")  # fmt: skip


def to_rgb(img: Image.Image, path: str | os.PathLike = "image") -> Image.Image:
    """``img`` as 8-bit RGB: 16/32-bit integer greyscale (``I;16*``, ``I``) scaled from 0..65535 to 0..255 (PIL's own
    conversion clips it, turning most pixels white); palette images through their palette (transparency dropped);
    float images (``F``) are refused. Always a new image."""
    if img.mode.startswith("I;16") or img.mode == "I":
        import numpy as np

        values = np.asarray(img).astype(np.int64)
        eight = (np.clip(values, 0, 65535) + 128) // 257
        return Image.fromarray(eight.astype(np.uint8)).convert("RGB")
    if img.mode == "F":
        raise NevaError(f"image {path} has 32-bit float pixels (mode F), which have no defined range; save it as "
                        "8-bit RGB")  # fmt: skip
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")  # a copy: the caller may close img


@dataclass(frozen=True)
class ImageProcessor:
    """Load an image and turn it into normalised ``[3, size, size]`` float tensors: one view, or with ``anyres`` the
    base view and the tiles (``layout``, required then, also counts the embeddings each image becomes)."""

    image_size: int = 336
    aspect: str = "pad"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    layout: ImageLayout | None = None

    def __post_init__(self) -> None:
        try:
            mode, _ = parse_aspect(self.aspect)
        except NevaError:
            raise NevaError(f"image_aspect_ratio {self.aspect!r} is not one of {', '.join(ASPECTS)}") from None
        layout = self.layout
        if layout is not None and (layout.aspect, layout.image_size) != (self.aspect, self.image_size):
            raise NevaError(f"the image layout ({layout.aspect}, {layout.image_size}px) differs from the processor's "
                            f"({self.aspect}, {self.image_size}px)")  # fmt: skip
        if mode == "anyres" and layout is None:
            raise NevaError(f"image_aspect_ratio {self.aspect} needs the tile layout (model.data.image_grid_pinpoints "
                            "and the vision encoder's patch size): build the processor with "
                            "layout=ImageLayout(...)")  # fmt: skip

    @classmethod
    def for_encoder(cls, vision_model_type: str, image_size: int, aspect: str = "pad",
                    layout: ImageLayout | None = None) -> ImageProcessor:  # fmt: skip
        """The processor of a vision encoder: its ``vision_model_type`` (``clip``/``siglip``) picks the normalisation.

        Use ``neva_tools.mappings.siglip.vision_model_type(arch)`` for an architecture.
        """
        if vision_model_type not in NORMALIZATION:
            raise NevaError(f"no image normalisation for vision model type {vision_model_type!r}; known: "
                            f"{', '.join(NORMALIZATION)}")  # fmt: skip
        mean, std = NORMALIZATION[vision_model_type]
        return cls(image_size, aspect, mean, std, layout)

    def open(self, path: str | os.PathLike) -> Image.Image:
        """Open and fully decode an image as RGB; a missing or corrupt file is an error naming it."""
        try:
            with Image.open(path) as img:
                _check_pixels(img, path)
                img.load()
                return to_rgb(img, path)
        except FileNotFoundError:
            raise NevaError(f"image {path} does not exist") from None
        except _DECODE_ERRORS as exc:
            raise NevaError(f"image {path} cannot be decoded ({exc})") from None

    def to_square(self, img: Image.Image) -> Image.Image:
        """``pad`` (and an untiled ``anyres`` image): centre the image on a square canvas of the mean colour;
        ``square``: as is."""
        if self.aspect == "square" or img.width == img.height:
            return img
        side = max(img.width, img.height)
        fill = tuple(int(c * 255) for c in self.mean)  # LLaVA-1.5 truncates the mean colour
        canvas = Image.new("RGB", (side, side), fill)
        canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
        return canvas

    def normalise(self, img: Image.Image) -> torch.Tensor:
        """``[3, H, W]``: pixels scaled to [0, 1] and normalised with the encoder's mean and std."""
        tensor = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3)
        tensor = tensor.permute(2, 0, 1).float().div_(255.0)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (tensor - mean) / std

    def __call__(self, img: Image.Image | str | os.PathLike) -> torch.Tensor:
        """The normalised one-view tensor ``[3, size, size]`` of an image or image path (never tiled)."""
        if not isinstance(img, Image.Image):
            img = self.open(img)
        return self.normalise(self.to_square(img).resize((self.image_size, self.image_size), Image.Resampling.BICUBIC))

    def views(self, img: Image.Image | str | os.PathLike, *, tiled: bool) -> torch.Tensor:
        """``[tiles, 3, size, size]``: the base view and the tiles when ``tiled`` (``anyres``), else one view."""
        if not isinstance(img, Image.Image):
            img = self.open(img)
        if not tiled:
            return self(img)[None]
        if self.layout is None or not self.layout.tiled:
            raise NevaError(f"image_aspect_ratio {self.aspect} does not tile images")
        return torch.stack([self.normalise(view) for view in tile_views(img, self.layout)])

    def token_counts(self, images: Sequence[Image.Image | str | os.PathLike]) -> list[int]:
        """Embeddings each image of one sample becomes (:func:`neva_tools.data.anyres.sample_image_tokens`); image
        files are read for their size only when the sample's images are tiled."""
        if self.layout is None:
            raise NevaError("counting image tokens needs the processor's layout (ImageProcessor(layout=...))")
        tiled = self.layout.tiles_images(len(images))
        sizes = [_size(img) if tiled else None for img in images]
        return sample_image_tokens(self.layout, sizes)

    def batch(self, images: Sequence[Image.Image | str | os.PathLike]) -> ImageBatch:
        """The images of one sample, processed as training does (a single image is tiled with ``anyres``)."""
        tiled = self.layout is not None and self.layout.tiles_images(len(images))
        opened = [img if isinstance(img, Image.Image) else self.open(img) for img in images]
        views = [self.views(img, tiled=tiled) for img in opened]
        size = self.image_size
        pixels = torch.cat(views) if views else torch.empty(0, 3, size, size)
        sizes = torch.tensor([[img.height, img.width] for img in opened], dtype=torch.long).view(-1, 2)
        tokens = None
        if self.layout is not None:
            counts = sample_image_tokens(self.layout, [(img.height, img.width) for img in opened])
            tokens = torch.tensor(counts, dtype=torch.long)
        return ImageBatch(pixels, torch.tensor([len(v) for v in views], dtype=torch.int), sizes, tokens)


def _size(img: Image.Image | str | os.PathLike) -> tuple[int, int]:
    return (img.height, img.width) if isinstance(img, Image.Image) else image_size_of(img)
