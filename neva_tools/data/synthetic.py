"""A synthetic visual-QA dataset of coloured shapes, for the demo and the tests (no downloads); and a video task.

Each image is one coloured shape at one position on a plain background. Pretraining records caption
the image (``plain`` template shape, like LLaVA-CC3M); finetuning records ask about the colour, the
shape or the position, with one-word answers; a held-out split is written separately.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 50, 170),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"left": (0.3, 0.5), "right": (0.7, 0.5), "top": (0.5, 0.3), "bottom": (0.5, 0.7)}
QUESTIONS = {
    "colour": "What colour is the shape?",
    "shape": "What shape is in the image?",
    "position": "Where is the shape?",
}


@dataclass(frozen=True)
class Scene:
    """What one image shows."""

    colour: str
    shape: str
    position: str


def draw(scene: Scene, size: int = 64) -> Image.Image:
    """Render a scene on a light grey background."""
    img = Image.new("RGB", (size, size), (235, 235, 235))
    pen = ImageDraw.Draw(img)
    cx, cy = (int(f * size) for f in POSITIONS[scene.position])
    r = size // 6
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        pen.ellipse(box, fill=fill)
    elif scene.shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def caption(scene: Scene) -> str:
    """The pretraining caption of a scene."""
    return f"A {scene.colour} {scene.shape} on the {scene.position}."


def answer(scene: Scene, kind: str) -> str:
    """The one-word answer to a question of ``kind`` about a scene."""
    return {"colour": scene.colour, "shape": scene.shape, "position": scene.position}[kind]


def make_dataset(root: str | Path, *, train: int = 200, heldout: int = 60, size: int = 64, seed: int = 0) -> dict:
    """Write images and ``pretrain.json``, ``finetune.json``, ``heldout.json`` under ``root``; return paths."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    splits: dict[str, list[dict]] = {"pretrain": [], "finetune": [], "heldout": []}
    for i in range(train + heldout):
        scene = Scene(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(POSITIONS)))
        name = f"{i:05d}.png"
        draw(scene, size).save(root / "images" / name)
        if i < train:
            splits["pretrain"].append({
                "id": f"cap-{i}", "image": name,
                "conversations": [{"from": "human", "value": "<image>\nDescribe the image."},
                                  {"from": "gpt", "value": caption(scene)}],
            })  # fmt: skip
        split = "finetune" if i < train else "heldout"
        for kind, question in QUESTIONS.items():
            splits[split].append({
                "id": f"{kind}-{i}", "image": name, "kind": kind,
                "conversations": [{"from": "human", "value": f"<image>\n{question} Answer with one word."},
                                  {"from": "gpt", "value": answer(scene, kind)}],
            })  # fmt: skip
    return {"images": root / "images", **write_splits(root, splits)}


def write_splits(root: Path, splits: dict[str, list[dict]]) -> dict[str, Path]:
    """Each split's records as ``root/SPLIT.json``; returns the paths by split."""
    paths = {}
    for split, records in splits.items():
        paths[split] = root / f"{split}.json"
        paths[split].write_text(json.dumps(records, indent=1))
    return paths


def corpus() -> list[str]:
    """Text for training a tokenizer that covers every caption, question and answer."""
    lines = []
    for colour in COLOURS:
        for shape in SHAPES:
            for position in POSITIONS:
                scene = Scene(colour, shape, position)
                lines.append(caption(scene))
                lines += [f"{q} Answer with one word. {answer(scene, k)}" for k, q in QUESTIONS.items()]
    lines.append("Describe the image.")
    return lines


#: The synthetic video task: the direction a shape moves (the answer), and how (dx, dy) it moves.
MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
VIDEO_QUESTION = "Which way does the shape move? Answer with one word."


def moving_frames(colour: str, direction: str, frames: int, size: int, rng: random.Random) -> list[Image.Image]:
    """Frames of a ``colour`` square crossing a ``size`` canvas in ``direction``; its start and travel (at least three
    quarters of the free span) and its place across the motion are random."""
    side = size // 3
    span = size - side
    travel = rng.randint(span * 3 // 4, span)
    start = rng.randint(0, span - travel)  # along the axis of motion, counted in the direction of motion
    across = rng.randint(0, span)
    dx, dy = MOTIONS[direction]
    out = []
    for i in range(frames):
        along = start + round(travel * i / max(1, frames - 1))
        pos = along if dx + dy > 0 else span - along
        x, y = (pos, across) if dx else (across, pos)
        img = Image.new("RGB", (size, size), (235, 235, 235))
        ImageDraw.Draw(img).rectangle((x, y, x + side - 1, y + side - 1), fill=COLOURS[colour])
        out.append(img)
    return out


def write_video(path: str | Path, frames: list[Image.Image], fps: int) -> Path:
    """An MPEG-4 clip of ``frames`` at ``fps`` (PyAV)."""
    import av

    path = Path(path)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames[0].width, frames[0].height, "yuv420p"
        stream.options = {"qscale": "2"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_video_dataset(root: str | Path, *, train: int = 64, heldout: int = 16, frames: int = 8, fps: int = 4,
                       size: int = 32, seed: int = 0) -> dict:  # fmt: skip
    """Write clips under ``root/videos`` and ``video_train.json``, ``video_heldout.json`` (``<video>`` records asking
    which way the shape moves; directions balanced); return paths."""
    root = Path(root)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    splits: dict[str, list[dict]] = {"video_train": [], "video_heldout": []}
    directions = list(MOTIONS)
    for i in range(train + heldout):
        direction = directions[i % len(directions)]
        name = f"{i:05d}.mp4"
        write_video(root / "videos" / name, moving_frames(rng.choice(list(COLOURS)), direction, frames, size, rng), fps)
        splits["video_train" if i < train else "video_heldout"].append({
            "id": f"motion-{i}", "video": name,
            "conversations": [{"from": "human", "value": f"<video>\n{VIDEO_QUESTION}"},
                              {"from": "gpt", "value": direction}],
        })  # fmt: skip
    return {"videos": root / "videos", **write_splits(root, splits)}


def video_corpus() -> list[str]:
    """Text for a tokenizer that also covers the video task (with :func:`corpus`)."""
    return [f"{VIDEO_QUESTION} {direction}" for direction in MOTIONS]
