"""A synthetic visual-QA dataset of coloured shapes, for the demo and the tests (no downloads).

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
    paths = {"images": root / "images"}
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
