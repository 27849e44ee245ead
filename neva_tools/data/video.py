"""Video records: which frames a clip is sampled at, decoding them with PyAV, and the embeddings a clip becomes.

Sampling (``model.data``: ``base_interval``, ``video_min_frames``, ``video_max_frames`` / LLaVA-NeXT's
``frames_upbound``), as Qwen-VL's finetuning data loader does it: a clip of ``F`` frames at ``fps`` lasts
``F / fps`` seconds and is sampled at ``round(duration / base_interval)`` frames (one every ``base_interval``
seconds), clamped to ``[video_min_frames, video_max_frames]`` and to ``F``; the frames are spread uniformly over the
clip, ``linspace(0, F - 1, n)`` truncated to integers (LLaVA-NeXT's ``frames_upbound`` resampling). A clip with
fewer than ``video_min_frames`` frames is too short: an error, as is a file that is empty, corrupt, has no video
stream, no frame rate, or frames larger than the image limit.

Each sampled frame is scaled (aspect kept) into ``[video_min_frame_pixels, video_max_frame_pixels]`` pixels while
it is converted to RGB (FFmpeg's scaler, so a 4K clip is never held at full size), then goes through the same
:class:`~neva_tools.data.images.ImageProcessor` as an image (aspect mode ``pad``/``square``; a frame is one view,
never tiled, as LLaVA-OneVision's video processor does it). The encoder's input size is fixed, so the pixel limits
bound decoding and resampling, not the token count.

Tokens (:func:`video_tokens`, the one count used by validation, length checks, packing and the model): every frame's
``side × side`` features are pooled 2×2 by bilinear interpolation to ``⌈side/2⌉²`` (LLaVA-OneVision's
``get_2dPool`` / transformers' ``apply_pooling``), the frames one after the other, plus one ``image_newline`` at the
end of the clip when the projector has one (``mm_patch_merge_type: spatial_unpad``), as transformers'
``LlavaOnevisionModel.get_video_features`` and ``LlavaOnevisionProcessor`` count it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from neva_tools.errors import NevaError

if TYPE_CHECKING:  # torch and the image processor are imported where used: neva data validate stays light
    import torch
    from av.container import InputContainer
    from PIL import Image

    from neva_tools.data.anyres import ImageLayout
    from neva_tools.data.images import ImageBatch, ImageProcessor

#: ``model.data`` video keys and their defaults (Qwen-VL's finetuning defaults for interval and frame bounds).
DEFAULT_INTERVAL = 2.0
DEFAULT_MIN_FRAMES = 4
DEFAULT_MAX_FRAMES = 8


class VideoError(NevaError):
    """A video a record names cannot be used; ``kind`` is the ``neva data validate`` problem kind."""

    def __init__(self, message: str, kind: str = "video_unreadable") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class VideoInfo:
    """What a clip's header (or its packets) says: frame count, frame rate, frame size."""

    frames: int
    fps: float
    width: int
    height: int

    @property
    def duration(self) -> float:
        """Seconds: frames / fps."""
        return self.frames / self.fps

    def describe(self) -> str:
        """``2.30 s, 23 frames at 10 fps, 32x24`` for messages."""
        return f"{self.duration:.2f} s, {self.frames} frames at {self.fps:g} fps, {self.width}x{self.height}"


@dataclass(frozen=True)
class VideoSampling:
    """How a clip's frames are chosen and sized (see the module docstring)."""

    base_interval: float = DEFAULT_INTERVAL
    min_frames: int = DEFAULT_MIN_FRAMES
    max_frames: int = DEFAULT_MAX_FRAMES
    max_frame_pixels: int | None = None
    min_frame_pixels: int | None = None

    def __post_init__(self) -> None:
        if not self.base_interval > 0 or not math.isfinite(self.base_interval):
            raise NevaError(f"model.data.base_interval ({self.base_interval}) must be a positive number of seconds")
        if not 1 <= self.min_frames <= self.max_frames:
            raise NevaError(f"model.data.video_min_frames ({self.min_frames}) must be at least 1 and at most "
                            f"video_max_frames / frames_upbound ({self.max_frames})")  # fmt: skip
        low, high = self.min_frame_pixels, self.max_frame_pixels
        if (low is not None and low < 1) or (high is not None and high < 1):
            raise NevaError(f"model.data.video_min_frame_pixels ({low}) and video_max_frame_pixels ({high}) must be "
                            "positive pixel counts (or null: no limit)")  # fmt: skip
        if low is not None and high is not None and low > high:
            raise NevaError(f"model.data.video_min_frame_pixels ({low}) must not exceed video_max_frame_pixels "
                            f"({high})")  # fmt: skip

    @classmethod
    def from_config(cls, data: Mapping[str, Any] | None) -> VideoSampling:
        """The sampling of ``model.data`` (a DictConfig or dict): ``frames_upbound`` (LLaVA-NeXT; 0 or null: unset)
        is ``video_max_frames`` and must agree with it when both differ from the default."""
        data = data or {}

        def get(key: str, default: Any) -> Any:
            value = data.get(key)
            return default if value is None else value

        high = int(get("video_max_frames", DEFAULT_MAX_FRAMES))
        upbound = int(get("frames_upbound", 0))
        if upbound:
            if high not in (upbound, DEFAULT_MAX_FRAMES):
                raise NevaError(f"model.data.frames_upbound ({upbound}) and model.data.video_max_frames ({high}) are "
                                "the same setting (LLaVA-NeXT's and Qwen-VL's names); set one of them")  # fmt: skip
            high = upbound
        low = int(get("video_min_frames", DEFAULT_MIN_FRAMES))
        pixels = [data.get(k) for k in ("video_max_frame_pixels", "video_min_frame_pixels")]
        return cls(float(get("base_interval", DEFAULT_INTERVAL)), low, high,
                   *(int(p) if p is not None else None for p in pixels))  # fmt: skip

    def count(self, frames: int, fps: float) -> int:
        """Frames sampled from a clip of ``frames`` frames at ``fps``: one per ``base_interval`` seconds, clamped to
        ``[min_frames, max_frames]`` and to ``frames``."""
        wanted = round(frames / fps / self.base_interval)
        return min(max(wanted, self.min_frames), self.max_frames, frames)

    def indices(self, frames: int, fps: float) -> list[int]:
        """The 0-based indices of the sampled frames, spread uniformly (``linspace`` truncated to integers)."""
        if frames < self.min_frames:
            raise VideoError(f"{frames} frames, fewer than video_min_frames ({self.min_frames})", "video_too_short")
        return [int(i) for i in np.linspace(0, frames - 1, self.count(frames, fps))]

    def frame_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) a ``height × width`` frame is scaled to: aspect kept, into the pixel limits."""
        pixels = height * width
        if self.max_frame_pixels is not None and pixels > self.max_frame_pixels:
            scale = math.sqrt(self.max_frame_pixels / pixels)
            return max(1, math.floor(height * scale)), max(1, math.floor(width * scale))
        if self.min_frame_pixels is not None and pixels < self.min_frame_pixels:
            scale = math.sqrt(self.min_frame_pixels / pixels)
            return math.ceil(height * scale), math.ceil(width * scale)
        return height, width


def video_tokens(frames: int, side: int, newline: bool) -> int:
    """Embeddings a clip of ``frames`` sampled frames becomes: ``⌈side/2⌉²`` per frame after the 2×2 pooling, plus
    one ``image_newline`` with a projector that has one (module docstring)."""
    if frames < 1 or side < 1:
        raise NevaError(f"a clip needs at least one frame of at least one feature (found {frames} frames, {side})")
    return frames * math.ceil(side / 2) ** 2 + int(newline)


def pool_frames(features: torch.Tensor, side: int) -> torch.Tensor:
    """``[frames, side², h]`` frame features → ``[frames, ⌈side/2⌉², h]``: 2×2 bilinear pooling (OneVision)."""
    import torch

    frames, positions, hidden = features.shape
    if positions != side * side:
        raise NevaError(f"frame features have {positions} positions, not {side}x{side}")
    grid = features.view(frames, side, side, hidden).permute(0, 3, 1, 2)
    half = math.ceil(side / 2)
    pooled = torch.nn.functional.interpolate(grid, size=[half, half], mode="bilinear")
    return pooled.permute(0, 2, 3, 1).reshape(frames, half * half, hidden)


def _open(path: str | os.PathLike) -> InputContainer:
    import av

    if not os.path.isfile(path):
        raise VideoError(f"video {path} does not exist", "video_missing")
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError) as exc:
        raise VideoError(f"video {path} cannot be opened ({exc}); is it a video file?") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"video {path} has no video stream")
    return container


def _info(container: InputContainer, path: str | os.PathLike) -> VideoInfo:
    import av

    from neva_tools.data.images import MAX_PIXELS

    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate
    width, height = stream.codec_context.width, stream.codec_context.height
    if not rate or float(rate) <= 0:
        raise VideoError(f"video {path} has no frame rate in its header")
    if width * height > MAX_PIXELS:
        raise VideoError(f"video {path} has {width}x{height} frames, above the image limit of {MAX_PIXELS} pixels")
    frames = stream.frames
    if frames <= 0:  # not in the header: count the packets (demuxing only, no decoding)
        try:
            frames = sum(1 for packet in container.demux(stream) if packet.size)
        except (av.FFmpegError, OSError, ValueError) as exc:
            raise VideoError(f"video {path} cannot be read ({exc})") from None
        container.seek(0)
    info = VideoInfo(int(frames), float(rate), int(width), int(height))
    if info.frames < 1:
        raise VideoError(f"video {path} holds no frames ({info.describe()})")
    return info


def probe(path: str | os.PathLike) -> VideoInfo:
    """Frame count, frame rate and size of a clip from its header (its packets when the header has no count)."""
    container = _open(path)
    try:
        return _info(container, path)
    finally:
        container.close()


def decode_frames(path: str | os.PathLike, sampling: VideoSampling) -> tuple[list[Image.Image], VideoInfo]:
    """The sampled frames of a clip as RGB images (scaled into the pixel limits) and its :class:`VideoInfo`; every
    failure is a :class:`VideoError` naming the file, its duration and frame count."""
    import av

    container = _open(path)
    try:
        info = _info(container, path)
        try:
            wanted = sampling.indices(info.frames, info.fps)
        except VideoError as exc:
            raise VideoError(f"video {path} is too short ({info.describe()}): {exc}", exc.kind) from None
        height, width = sampling.frame_size(info.height, info.width)
        targets, frames, index = set(wanted), [], -1
        try:
            for index, frame in enumerate(container.decode(video=0)):
                if index in targets:
                    frames.append(frame.reformat(width=width, height=height, format="rgb24").to_image())
                if index >= wanted[-1]:
                    break
        except (av.FFmpegError, OSError, ValueError, MemoryError) as exc:
            raise VideoError(f"video {path} is corrupt: decoding failed after {index + 1} frames ({info.describe()}; "
                             f"{exc})") from None  # fmt: skip
        if len(frames) != len(wanted):
            raise VideoError(f"video {path} is corrupt or truncated: {index + 1} frames decoded, but frame "
                             f"{wanted[-1]} was sampled ({info.describe()})")  # fmt: skip
        return frames, info
    finally:
        container.close()


def video_pixels(path: str | os.PathLike, sampling: VideoSampling, processor: ImageProcessor) -> torch.Tensor:
    """``[frames, 3, size, size]``: the sampled frames through the image processor, one view each."""
    import torch

    frames, _ = decode_frames(path, sampling)
    return torch.stack([processor(frame) for frame in frames])


def video_batch(path: str | os.PathLike, sampling: VideoSampling, processor: ImageProcessor,
                image_tokens: int) -> ImageBatch:  # fmt: skip
    """A clip as the model takes it: one media entry whose tiles are its sampled frames, its size row
    ``(height, width, 1)`` (the 1 marks a video) and its :func:`clip_tokens` count (``image_tokens``: embeddings of
    one view without a layout)."""
    import torch

    from neva_tools.data.images import ImageBatch

    pixels = video_pixels(path, sampling, processor)
    tokens = clip_tokens(len(pixels), processor.layout, image_tokens)
    size = torch.tensor([[*pixels.shape[-2:], 1]], dtype=torch.long)
    return ImageBatch(pixels, torch.tensor([len(pixels)], dtype=torch.int), size, torch.tensor([tokens]))


def frame_grid(layout: ImageLayout | None, image_tokens: int) -> tuple[int, bool]:
    """(features per frame side, whether a clip ends with ``image_newline``) of a model: its image layout's, or
    without one ``√image_tokens`` per side and no newline (a class token, which leaves no square, is refused)."""
    if layout is not None:
        return layout.side, layout.merge == "spatial_unpad"
    side = math.isqrt(image_tokens)
    if side * side != image_tokens:
        raise NevaError(f"video frames are pooled on a square feature grid, but an image is {image_tokens} embeddings "
                        "(a class token?); use a vision tower without the class token for video")  # fmt: skip
    return side, False


def clip_tokens(frames: int, layout: ImageLayout | None, image_tokens: int) -> int:
    """Embeddings a clip of ``frames`` sampled frames becomes in a model (:func:`video_tokens`, :func:`frame_grid`):
    the count validation, length checks, packing and the model share."""
    return video_tokens(frames, *frame_grid(layout, image_tokens))


def sampled_frames(path: str | os.PathLike, sampling: VideoSampling, *, decode: bool) -> tuple[int, VideoInfo]:
    """(frames sampled from a clip, its :class:`VideoInfo`): from the header alone, or by decoding the sampled frames
    (``decode``: finds corrupt data too); a clip that cannot be used is a :class:`VideoError`."""
    if decode:
        frames, info = decode_frames(path, sampling)
        return len(frames), info
    info = probe(path)
    try:
        return len(sampling.indices(info.frames, info.fps)), info
    except VideoError as exc:
        raise VideoError(f"video {path} is too short ({info.describe()}): {exc}", exc.kind) from None
