"""``NevaDataset.modality_lengths``: each record's modality and LLaVA's length (words of all turns) from the records
alone, what ``model.data.group_by_modality_length`` groups by."""

from __future__ import annotations

import json
from pathlib import Path

from neva_tools.data.dataset import NevaDataset
from neva_tools.data.images import ImageProcessor
from neva_tools.data.registry import DatasetSpec, DatasetUse


def test_modality_and_word_counts_without_reading_images(shapes: dict, tmp_path: Path) -> None:
    records = [
        {"id": "img", "image": "missing.png",  # never opened
         "conversations": [{"from": "human", "value": "<image>\nWhat colour is the shape?"},
                           {"from": "gpt", "value": "Red."}]},
        {"id": "text", "conversations": [{"from": "human", "value": "Describe  the\nimage."},
                                         {"from": "gpt", "value": "A red circle on the left."}]},
        {"id": "two", "images": ["a.png", "b.png"],
         "conversations": [{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": ""}]},
        {"id": "empty", "conversations": [{"from": "human", "value": " "}, {"from": "gpt", "value": ""}]},
    ]  # fmt: skip
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(records))
    ds = NevaDataset([DatasetUse(DatasetSpec("mixed", path, tmp_path, "vicuna_v1"))], shapes["tokenizer"],
                     ImageProcessor(image_size=28))  # fmt: skip
    images, lengths = ds.modality_lengths()
    assert images == [True, False, True, False]
    assert lengths == [6 + 1, 3 + 6, 2, 1]  # "<image>\nWhat" splits into two words, as in LLaVA; never 0
