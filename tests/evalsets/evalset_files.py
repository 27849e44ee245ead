"""MMBench-layout TSVs of synthetic shapes for the benchmark tests (base64 PNGs, as VLMEvalKit's files hold)."""

from __future__ import annotations

import base64
import csv
import io
from pathlib import Path
from typing import Any

import pytest

from neva_tools.data.synthetic import Scene, draw
from neva_tools.evalsets import runner

HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "split", "image"]


def png_base64(scene: Scene, size: int = 28) -> str:
    buffer = io.BytesIO()
    draw(scene, size).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_tsv(path: Path, rows: list[dict[str, Any]], header: list[str] = HEADER) -> Path:
    """An MMBench-layout TSV (missing keys are empty cells), written as VLMEvalKit's files are (pandas to_csv)."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, header, delimiter="\t", lineterminator="\n", restval="", extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    return path


def shapes_questions() -> list[dict[str, Any]]:
    """Five questions about synthetic shapes: 3 and 4 options, a hint, one without an answer (predict only)."""
    red_circle = png_base64(Scene("red", "circle", "left"))
    blue_square = png_base64(Scene("blue", "square", "top"))
    return [
        {"index": 0, "question": "What colour is the shape?", "A": "red", "B": "blue", "C": "green", "answer": "A",
         "category": "attribute_recognition", "l2-category": "finegrained_perception (instance-level)",
         "split": "dev", "image": red_circle},
        {"index": 1, "question": "What shape is in the image?", "hint": "The image shows one shape.", "A": "square",
         "B": "circle", "C": "triangle", "D": "star", "answer": "B", "category": "image_topic",
         "l2-category": "coarse_perception", "split": "dev", "image": "0"},
        {"index": 2, "question": "Where is the shape?", "A": "bottom", "B": "left", "C": "top", "answer": "C",
         "category": "object_localization", "l2-category": "finegrained_perception (instance-level)",
         "split": "dev", "image": blue_square},
        {"index": 3, "question": "Which colour is it?", "A": "purple", "B": "blue", "answer": "B",
         "category": "attribute_recognition", "l2-category": "finegrained_perception (instance-level)",
         "split": "dev", "image": "2"},
        {"index": 4, "question": "Is there a shape?", "A": "yes", "B": "no", "category": "image_topic",
         "l2-category": "coarse_perception", "split": "dev", "image": "2"},
    ]  # fmt: skip


class Counter:
    """Wraps ``generate_batch``: counts the requests, optionally interrupts at a given call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, interrupt_at: int | None = None) -> None:
        self.real = getattr(runner.generate_batch, "real", runner.generate_batch)  # the function, not a Counter
        self.requests, self.calls, self.interrupt_at = 0, 0, interrupt_at
        monkeypatch.setattr(runner, "generate_batch", self)

    def __call__(self, model: Any, tokenizer: Any, requests: list, **kwargs: Any) -> list:
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the evaluation
        self.requests += len(requests)
        return self.real(model, tokenizer, requests, **kwargs)
