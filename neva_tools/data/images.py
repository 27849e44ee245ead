"""Image preprocessing: ``square`` (resize, no crop) or ``pad`` (LLaVA-1.5 expand-to-square), then the vision
encoder's normalisation (CLIP's or SigLIP's, see :meth:`ImageProcessor.for_encoder`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from PIL import Image, UnidentifiedImageError

from neva_tools.errors import NevaError

#: OpenAI CLIP's normalisation (open_clip ``OPENAI_DATASET_MEAN/STD``, HF ``CLIPImageProcessor``).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: SigLIP's normalisation to [-1, 1] (HF ``SiglipImageProcessor``, open_clip/timm SigLIP ``INCEPTION_MEAN/STD``).
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
#: megatron-core ``vision_model_type`` → (mean, std).
NORMALIZATION = {"clip": (CLIP_MEAN, CLIP_STD), "siglip": (SIGLIP_MEAN, SIGLIP_STD)}
ASPECT_MODES = ("square", "pad")


def image_token_count(image_size: int, patch_size: int, class_token: bool = False) -> int:
    """Embeddings one image expands to: ⌊size / patch⌋² (+1 with the class token).

    224/14 → 256, 336/14 → 576; SigLIP so400m's 384/14 → 729 (its patch convolution drops the last 6 pixels).
    """
    if image_size < patch_size or patch_size < 1:
        raise NevaError(f"image size ({image_size}) must be at least the patch size ({patch_size})")
    return (image_size // patch_size) ** 2 + int(class_token)


@dataclass(frozen=True)
class ImageProcessor:
    """Load an image and turn it into a normalised ``[3, size, size]`` float tensor."""

    image_size: int = 336
    aspect: str = "pad"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        if self.aspect not in ASPECT_MODES:
            raise NevaError(f"image_aspect_ratio {self.aspect!r} is not one of {', '.join(ASPECT_MODES)}")

    @classmethod
    def for_encoder(cls, vision_model_type: str, image_size: int, aspect: str = "pad") -> ImageProcessor:
        """The processor of a vision encoder: its ``vision_model_type`` (``clip``/``siglip``) picks the normalisation.

        Use ``neva_tools.mappings.siglip.vision_model_type(arch)`` for an architecture.
        """
        if vision_model_type not in NORMALIZATION:
            raise NevaError(f"no image normalisation for vision model type {vision_model_type!r}; known: "
                            f"{', '.join(NORMALIZATION)}")  # fmt: skip
        mean, std = NORMALIZATION[vision_model_type]
        return cls(image_size, aspect, mean, std)

    def open(self, path: str | os.PathLike) -> Image.Image:
        """Open and fully decode an image as RGB; a missing or corrupt file is an error naming it."""
        try:
            with Image.open(path) as img:
                img.load()
                return img.convert("RGB")
        except FileNotFoundError:
            raise NevaError(f"image {path} does not exist") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise NevaError(f"image {path} cannot be decoded ({exc})") from None

    def to_square(self, img: Image.Image) -> Image.Image:
        """``pad``: centre the image on a square canvas of the mean colour; ``square``: as is."""
        if self.aspect == "square" or img.width == img.height:
            return img
        side = max(img.width, img.height)
        fill = tuple(int(c * 255) for c in self.mean)  # LLaVA-1.5 truncates the mean colour
        canvas = Image.new("RGB", (side, side), fill)
        canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
        return canvas

    def __call__(self, img: Image.Image | str | os.PathLike) -> torch.Tensor:
        """The normalised tensor of an image or image path."""
        if not isinstance(img, Image.Image):
            img = self.open(img)
        img = self.to_square(img).resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        tensor = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3)
        tensor = tensor.permute(2, 0, 1).float().div_(255.0)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (tensor - mean) / std
