"""The training ``Dataset`` and collate function: what megatron-core's ``LLaVAModel`` consumes.

Each item is one record rendered with its conversation template: ``input_ids`` with one
``IMAGE_TOKEN_INDEX`` per image (between ``<extra_id_4>`` and ``<extra_id_5>`` with ``im_start_end``, NeMo's
``mm_cfg.use_im_start_end``, or between the two tokens ``im_start_end`` names, ``mm_cfg.im_start_end_tokens``),
``labels`` shifted left within the sample (``labels[t]`` is the target of position ``t``), and the sample's images
as normalised tensors: every image's views (one, or with ``anyres`` the base view and the tiles), how many each image
has (``num_image_tiles``), its size and the embeddings it becomes (``image_tokens``,
:func:`neva_tools.data.anyres.sample_image_tokens`, what every length check counts). Images are decoded lazily in
``__getitem__``, and the tokenizer is loaded once per worker, so ``num_workers > 0`` works.
``PackedNevaDataset`` packs samples (first-fit-decreasing on lengths after image expansion) so that
one item is one packed sequence with per-sample positions and boundaries. ``NevaDataset.modality_lengths`` gives
each record's modality and word count without reading images (``train.sampler.ModalityGroupedSampler``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from neva_tools.data.images import ImageBatch, ImageProcessor
from neva_tools.data.packing import first_fit_decreasing, pack_sequences
from neva_tools.data.records import Record, load_annotations, media_path_problem, media_problems, resolve_media
from neva_tools.data.registry import DatasetUse, sample_indices
from neva_tools.data.templates import IGNORE_INDEX, IMAGE_TOKEN_INDEX, tokenize_conversation
from neva_tools.data.video import VideoSampling, clip_tokens, sampled_frames, video_batch
from neva_tools.errors import NevaError
from neva_tools.tokenizer.text import TextTokenizer


@dataclass(frozen=True)
class _Item:
    record: Record
    image_folder: Path | None
    template: str
    video_folder: Path | None = None

    def media(self) -> list[Path]:
        """The record's image paths, or its one video path, resolved against their folders."""
        if self.record.video is not None:
            return [resolve_media(self.record.video, self.video_folder)]
        return [resolve_media(p, self.image_folder) for p in self.record.images]


def load_items(uses: Sequence[DatasetUse], default_template: str | None, seed: int, *,
               allow_outside: bool = False, video_folder: str | os.PathLike | None = None) -> list[_Item]:  # fmt: skip
    """The records a dataset list selects, in order; unparsable records, records training cannot use (malformed
    ``image``/``images``/``video``, ``<video>`` tags that do not match the video) and image or video paths leaving
    the dataset's image folder (videos: ``video_folder`` when given) unless ``allow_outside`` are an error listing
    them."""
    items = []
    refused: list[str] = []
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
            record = ann.records[i]
            why = [message for _, message, _ in media_problems(record)]
            videos = Path(video_folder) if video_folder is not None else use.spec.data_path
            if not why:
                paths = (media_path_problem(p, use.spec.data_path, allow_outside) for p in record.images)
                why = [f"image {p!r}: {problem}" for p, problem in zip(record.images, paths, strict=True) if problem]
            if not why and record.video is not None:
                problem = media_path_problem(record.video, videos, allow_outside)
                why = [f"video {record.video!r}: {problem}"] if problem else []
            if why:
                refused.append(f"{record.where()}: {why[0]}"[:300])
            items.append(_Item(record, use.spec.data_path, template, videos))
    if refused:
        raise NevaError(f"{len(refused)} records training cannot use ({'; '.join(refused[:5])}); fix or remove them "
                        "(neva data validate lists them all)")  # fmt: skip
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
        im_start_end: bool | tuple[str, str] = False,
        allow_outside: bool = False,
        video: VideoSampling | None = None,
        video_folder: str | os.PathLike | None = None,
    ) -> None:
        self.items = load_items(uses, template, seed, allow_outside=allow_outside, video_folder=video_folder)
        self.video = video or VideoSampling()
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
        tok = tokenize_conversation(item.record.media_turns(), item.template, self.tokenizer, where=where,
                                    im_start_end=self.im_start_end)  # fmt: skip
        media = len(item.record.images) + int(item.record.video is not None)
        if tok.num_images != media:
            raise NevaError(f"{where}: {tok.num_images} <image>/<video> placeholders but {media} images or videos")
        if self.max_seq_length is not None:
            length = tok.expanded_length(self.image_token_counts(index))
            if length > self.max_seq_length:
                raise NevaError(f"{where}: {length} tokens after image expansion, more than max_seq_length "
                                f"{self.max_seq_length}")  # fmt: skip
        ids = torch.tensor(tok.input_ids, dtype=torch.long)
        labels = torch.tensor(tok.labels, dtype=torch.long)
        return ids[:-1], labels[1:], tok.num_images

    def modality_lengths(self) -> tuple[list[bool], list[int]]:
        """(has images, length) of every item from its record alone, no image or tokenizer read: LLaVA's
        ``modality_lengths``, the words (whitespace-separated) of all turns, at least 1 (what
        ``model.data.group_by_modality_length`` groups by)."""
        images = [bool(item.record.images) or item.record.video is not None for item in self.items]
        lengths = [max(1, sum(len(turn.text.split()) for turn in item.record.turns())) for item in self.items]
        return images, lengths

    def image_token_counts(self, index: int) -> list[int]:
        """Embeddings each image of item ``index`` becomes: the processor's layout counts them (reading the image
        sizes when they are tiled), else ``image_tokens`` each; a video is one entry, counted from the frames its
        header says are sampled (:func:`neva_tools.data.video.clip_tokens`)."""
        item = self.items[index]
        layout = self.image_processor.layout
        if item.record.video is not None:
            frames, _ = sampled_frames(item.media()[0], self.video, decode=False)
            return [clip_tokens(frames, layout, self.image_tokens)]
        if layout is None:
            return [self.image_tokens] * len(item.record.images)
        return self.image_processor.token_counts(item.media())

    def length(self, index: int) -> int:
        """Tokens of item ``index`` after shifting and image expansion (what packing counts)."""
        ids, _, images = self.tokenize(index)
        return len(ids) + sum(self.image_token_counts(index)) - images

    def image_batch(self, index: int) -> ImageBatch:
        """The item's images processed for the model (``anyres``: a single image is tiled); a video is one entry
        whose tiles are its sampled frames."""
        item = self.items[index]
        if item.record.video is None:
            return self.image_processor.batch(item.media())
        return video_batch(item.media()[0], self.video, self.image_processor, self.image_tokens)

    def images(self, index: int) -> torch.Tensor:
        """The item's image views as ``[tiles, 3, H, W]`` (one per image unless tiled; may be empty)."""
        return self.image_batch(index).pixels

    def __getitem__(self, index: int) -> dict[str, Any]:
        ids, labels, _ = self.tokenize(index)
        batch = self.image_batch(index)
        if batch.tokens is None:
            batch.tokens = torch.full((len(batch),), self.image_tokens, dtype=torch.long)
        return {"input_ids": ids, "labels": labels, **batch.fields(), "id": self.items[index].record.id}


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
        return pack_samples([self.base[i] for i in self.plan.bins[index]])


def pack_samples(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several samples of ``NevaDataset`` as one packed sample: their tokens end to end (``cu_seqlens`` marks the
    starts), their media concatenated in order."""
    packed = pack_sequences([(item["input_ids"], item["labels"]) for item in items])
    return {
        "input_ids": packed.input_ids,
        "labels": packed.labels,
        "position_ids": packed.position_ids,
        "cu_seqlens": packed.cu_seqlens,
        **{key: torch.cat([item[key] for item in items]) for key in IMAGE_KEYS if key != "image_sizes"},
        "image_sizes": media_sizes([item["image_sizes"] for item in items]),
        "id": ",".join(str(item["id"]) for item in items),
    }


#: The per-image batch keys (``ImageBatch.fields``): views, tiles per image, sizes, embeddings per image. A video is
#: one entry whose tiles are its frames and whose size row has a third column, 1 (:func:`media_sizes`).
IMAGE_KEYS = ("images", "num_image_tiles", "image_sizes", "image_tokens")


def media_sizes(sizes: Sequence[torch.Tensor]) -> torch.Tensor:
    """The size rows of several samples in one tensor: ``[n, 2]`` (height, width) without videos, else ``[n, 3]``
    with the third column 1 for a video (its frames are pooled 2×2 by the model) and 0 for an image."""
    if not sizes:
        return torch.zeros(0, 2, dtype=torch.long)
    if all(s.shape[-1] == 2 for s in sizes):
        return torch.cat(sizes)
    return torch.cat([s if s.shape[-1] == 3 else torch.nn.functional.pad(s, (0, 1)) for s in sizes])


def collate(batch: Sequence[dict[str, Any]], pad_id: int = 0) -> dict[str, Any]:
    """Pad to the longest sample: ``input_ids`` with ``pad_id``, ``labels`` with -100; ``loss_mask`` marks
    supervised positions; the image keys of all samples are concatenated (an item with ``images`` only has one
    view per image; ``image_tokens`` is kept when every item with images has it)."""
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
    with_images = [b for b in batch if len(b["images"])]
    images_t = torch.cat([b["images"] for b in with_images]) if with_images else torch.tensor([])
    tiles = [b.get("num_image_tiles", torch.ones(len(b["images"]), dtype=torch.int)) for b in with_images]
    tiles_t = torch.cat(tiles).int() if tiles else torch.ones(0, dtype=torch.int)
    sizes = [b.get("image_sizes", torch.zeros(len(t), 2, dtype=torch.long))
             for b, t in zip(with_images, tiles, strict=True)]  # fmt: skip
    num_images = int((input_ids == IMAGE_TOKEN_INDEX).sum())
    if num_images != len(tiles_t) or int(tiles_t.sum()) != len(images_t):
        raise NevaError(f"batch {[b['id'] for b in batch]}: {num_images} image tokens but {len(tiles_t)} images "
                        f"({len(images_t)} views for {int(tiles_t.sum())} tiles)")  # fmt: skip
    out = {
        "input_ids": input_ids,
        "labels": labels,
        "loss_mask": (labels != IGNORE_INDEX).float(),
        "position_ids": position_ids,
        "images": images_t,
        "num_image_tiles": tiles_t,
        "image_sizes": media_sizes(sizes),
        "cu_seqlens": [b.get("cu_seqlens") for b in batch],
        "ids": [b["id"] for b in batch],
    }
    if all("image_tokens" in b for b in with_images):
        counts = [b["image_tokens"] for b in with_images]
        out["image_tokens"] = torch.cat(counts).long() if counts else torch.zeros(0, dtype=torch.long)
    return out
