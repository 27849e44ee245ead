"""Tiny MP4 clips written with PyAV for the video tests (no files checked in)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np


def write_clip(path: Path, frames: int, fps: int = 10, width: int = 32, height: int = 24,
               frame: Callable[[int], np.ndarray] | None = None) -> Path:  # fmt: skip
    """An MPEG-4 clip of ``frames`` frames at ``fps``; frame ``i`` is ``frame(i)`` (``[height, width, 3]`` uint8) or
    a flat grey of value ``8 * i`` (so a decoded frame tells its index)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"qscale": "2"}  # near-lossless: decoded frames keep their value
        for i in range(frames):
            pixels = frame(i) if frame is not None else np.full((height, width, 3), (8 * i) % 256, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def moving_square(direction: str, frames: int, size: int = 32, side: int = 8) -> Callable[[int], np.ndarray]:
    """Frames of a white square on black moving ``left``, ``right``, ``up`` or ``down`` across a ``size`` canvas."""
    step = (size - side) / max(1, frames - 1)

    def frame(i: int) -> np.ndarray:
        pos = round(i * step)
        x, y = {"right": (pos, 12), "left": (size - side - pos, 12), "down": (12, pos), "up": (12, size - side - pos)}[
            direction
        ]
        out = np.zeros((size, size, 3), np.uint8)
        out[y : y + side, x : x + side] = 255
        return out

    return frame
