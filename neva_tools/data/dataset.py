"""The training ``Dataset`` and collate function: what megatron-core's ``LLaVAModel`` consumes.

Each item is one record rendered with its conversation template: ``input_ids`` with one
``IMAGE_TOKEN_INDEX`` per image (between ``<extra_id_4>`` and ``<extra_id_5>`` with ``im_start_end``, NeMo's
``mm_cfg.use_im_start_end``), ``labels`` shifted left within the sample (``labels[t]`` is the target
of position ``t``), and the sample's images as normalised tensors. Images are decoded lazily in
``__getitem__``, and the tokenizer is loaded once per worker, so ``num_workers > 0`` works.
``PackedNevaDataset`` packs samples (first-fit-decreasing on lengths after image expansion) so that
one item is one packed sequence with per-sample positions and boundaries.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from neva_tools.data.images import ImageProcessor
from neva_tools.data.packing import first_fit_decreasing, pack_sequences
from neva_tools.data.records import Record, load_annotations, resolve_media
from neva_tools.data.registry import DatasetUse, sample_indices
from neva_tools.data.templates import IGNORE_INDEX, IMAGE_TOKEN_INDEX, tokenize_conversation
from neva_tools.errors import NevaError
from neva_tools.tokenizer.text import TextTokenizer


@dataclass(frozen=True)
class _Item:
    record: Record
    image_folder: Path | None
    template: str


def load_items(uses: Sequence[DatasetUse], default_template: str | None, seed: int) -> list[_Item]:
    """The records a dataset list selects, in order; unparsable records are an error listing them."""
    items = []
    for use in uses:
        ann = load_annotations(use.spec.annotation_path)
        if ann.errors:
            listed = "; ".join(f"{e.where()}: {e.message}" for e in ann.errors[:5])
            raise NevaError(f"{len(ann.errors)} unparsable records in {ann.path} ({listed}); "
                            f"run: neva data validate {ann.path}")  # fmt: skip
        template = use.spec.template or default_template
        if template is None:
            raise NevaError(f"dataset {use.spec.name!r} has no template; set one in the registry or data.conv_template")
        for i in sample_indices(len(ann.records), use.percent, seed, use.spec.name):
            items.append(_Item(ann.records[i], use.spec.data_path, template))
    return items


class NevaDataset(Dataset):
    """LLaVA-format samples for ``LLaVAModel`` (see the module docstring)."""

    def __init__(
        self,
        uses: Sequence[DatasetUse],
        tokenizer_path: str | os.PathLike,
        image_processor: ImageProcessor,
        *,
        template: str | None = None,
        seed: int = 1234,
        max_seq_length: int | None = None,
        image_tokens: int = 576,
        im_start_end: bool = False,
    ) -> None:
        self.items = load_items(uses, template, seed)
        self.im_start_end = im_start_end
        self.tokenizer_path = Path(tokenizer_path)
        self.image_processor = image_processor
        self.max_seq_length = max_seq_length
        self.image_tokens = image_tokens
        self._tokenizer: TextTokenizer | None = None

    @property
    def tokenizer(self) -> TextTokenizer:
        """Loaded on first use in each process (keeps the dataset cheap to send to workers)."""
        if self._tokenizer is None:
            self._tokenizer = TextTokenizer(self.tokenizer_path)
        return self._tokenizer

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_tokenizer"] = None
        return state

    def __len__(self) -> int:
        return len(self.items)

    def tokenize(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(input_ids, labels) of item ``index``, shifted for next-token prediction, and its image count."""
        item = self.items[index]
        where = item.record.where()
        tok = tokenize_conversation(item.record.turns(), item.template, self.tokenizer, where=where,
                                    im_start_end=self.im_start_end)  # fmt: skip
        if tok.num_images != len(item.record.images):
            raise NevaError(f"{where}: {tok.num_images} <image> placeholders but {len(item.record.images)} images")
        if self.max_seq_length is not None and tok.expanded_length(self.image_tokens) > self.max_seq_length:
            raise NevaError(f"{where}: {tok.expanded_length(self.image_tokens)} tokens after image expansion, "
                            f"more than max_seq_length {self.max_seq_length}")  # fmt: skip
        ids = torch.tensor(tok.input_ids, dtype=torch.long)
        labels = torch.tensor(tok.labels, dtype=torch.long)
        return ids[:-1], labels[1:], tok.num_images

    def length(self, index: int) -> int:
        """Tokens of item ``index`` after shifting and image expansion (what packing counts)."""
        ids, _, images = self.tokenize(index)
        return len(ids) + images * (self.image_tokens - 1)

    def images(self, index: int) -> torch.Tensor:
        """The item's images as ``[n, 3, H, W]`` (``n`` may be 0)."""
        item = self.items[index]
        tensors = [self.image_processor(resolve_media(p, item.image_folder)) for p in item.record.images]
        size = self.image_processor.image_size
        return torch.stack(tensors) if tensors else torch.empty(0, 3, size, size)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ids, labels, _ = self.tokenize(index)
        return {"input_ids": ids, "labels": labels, "images": self.images(index), "id": self.items[index].record.id}


class PackedNevaDataset(Dataset):
    """Samples of a ``NevaDataset`` packed into sequences of at most ``max_seq_length`` tokens."""

    def __init__(self, base: NevaDataset, max_seq_length: int, *, truncate: bool = False) -> None:
        self.base = base
        names = [item.record.where() for item in base.items]
        self.plan = first_fit_decreasing([base.length(i) for i in range(len(base))], max_seq_length,
                                         truncate=truncate, names=names)  # fmt: skip
        if truncate and self.plan.truncated:
            raise NevaError("truncating packed samples that contain images is not supported; raise max_seq_length")

    def __len__(self) -> int:
        return len(self.plan.bins)

    def __getitem__(self, index: int) -> dict[str, Any]:
        members = self.plan.bins[index]
        parts = [self.base.tokenize(i)[:2] for i in members]
        packed = pack_sequences(parts)
        images = [self.base.images(i) for i in members]
        return {
            "input_ids": packed.input_ids,
            "labels": packed.labels,
            "position_ids": packed.position_ids,
            "cu_seqlens": packed.cu_seqlens,
            "images": torch.cat(images) if images else torch.empty(0),
            "id": ",".join(str(self.base.items[i].record.id) for i in members),
        }


def collate(batch: Sequence[dict[str, Any]], pad_id: int = 0) -> dict[str, Any]:
    """Pad to the longest sample: ``input_ids`` with ``pad_id``, ``labels`` with -100; ``loss_mask`` marks
    supervised positions; images of all samples are concatenated with one tile each."""
    longest = max(len(b["input_ids"]) for b in batch)
    n = len(batch)
    input_ids = torch.full((n, longest), pad_id, dtype=torch.long)
    labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.arange(longest).repeat(n, 1)
    for row, b in enumerate(batch):
        k = len(b["input_ids"])
        input_ids[row, :k] = b["input_ids"]
        labels[row, :k] = b["labels"]
        if "position_ids" in b:
            position_ids[row, :k] = b["position_ids"]
    images = [b["images"] for b in batch if len(b["images"])]
    images_t = torch.cat(images) if images else torch.tensor([])
    num_images = int((input_ids == IMAGE_TOKEN_INDEX).sum())
    if num_images != len(images_t):
        raise NevaError(f"batch {[b['id'] for b in batch]}: {num_images} image tokens but {len(images_t)} images")
    return {
        "input_ids": input_ids,
        "labels": labels,
        "loss_mask": (labels != IGNORE_INDEX).float(),
        "position_ids": position_ids,
        "images": images_t,
        "num_image_tiles": torch.ones(len(images_t), dtype=torch.int),
        "cu_seqlens": [b.get("cu_seqlens") for b in batch],
        "ids": [b["id"] for b in batch],
    }
