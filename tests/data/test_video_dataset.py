"""Video records in the training Dataset: a clip is one media entry whose tiles are its sampled frames; its token
count is the one validation, length checks and packing use; DataLoader workers decode it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader
from video_clips import write_clip

from neva_tools.data.anyres import ImageLayout
from neva_tools.data.dataset import NevaDataset, PackedNevaDataset, collate
from neva_tools.data.images import ImageProcessor
from neva_tools.data.registry import DatasetSpec, DatasetUse
from neva_tools.data.templates import IMAGE_TOKEN_INDEX
from neva_tools.data.validate import Settings, validate
from neva_tools.data.video import VideoSampling, clip_tokens, decode_frames
from neva_tools.errors import NevaError

SAMPLING = VideoSampling(base_interval=1.0, min_frames=2, max_frames=6)


@pytest.fixture
def mixed(shapes: dict, tmp_path: Path) -> Path:
    """Two clips (23 frames at 10 fps → 2 sampled; 60 at 10 fps → 6), two image records, a text-only one."""
    videos = tmp_path / "videos"
    write_clip(videos / "a.mp4", 23)
    write_clip(videos / "b.mp4", 60, width=48, height=24)
    images = json.loads(Path(shapes["finetune"]).read_text())[:2]
    ask = [{"from": "human", "value": "<video>\nWhat colour is the shape?"}, {"from": "gpt", "value": "red"}]
    rows = [{"id": "va", "video": "a.mp4", "conversations": ask}, *images,
            {"id": "t", "conversations": [{"from": "human", "value": "Say red."}, {"from": "gpt", "value": "red"}]},
            {"id": "vb", "video": "b.mp4", "conversations": ask}]  # fmt: skip
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(rows))
    return path


def _dataset(shapes: dict, mixed: Path, layout: ImageLayout | None = None, **kwargs: object) -> NevaDataset:
    use = DatasetUse(DatasetSpec("m", mixed, shapes["images"], "vicuna_v1"))
    processor = ImageProcessor(image_size=28, layout=layout)
    return NevaDataset([use], shapes["tokenizer"], processor, image_tokens=16, video=SAMPLING,
                       video_folder=mixed.parent / "videos", **kwargs)  # fmt: skip


def test_a_clip_is_one_entry_of_its_frames(shapes: dict, mixed: Path) -> None:
    ds = _dataset(shapes, mixed)
    for index, frames in ((0, 2), (4, 6)):
        item = ds[index]
        assert (item["input_ids"] == IMAGE_TOKEN_INDEX).sum() == 1  # <video> is the one media placeholder
        assert item["images"].shape == (frames, 3, 28, 28) and item["num_image_tiles"].tolist() == [frames]
        assert item["image_sizes"].tolist() == [[28, 28, 1]]  # the third column marks a video
        assert item["image_tokens"].tolist() == [clip_tokens(frames, None, 16)] == [frames * 4]
        assert ds.image_token_counts(index) == item["image_tokens"].tolist()  # header count = decoded count
    clip, _ = decode_frames(mixed.parent / "videos" / "a.mp4", SAMPLING)
    processor = ImageProcessor(image_size=28)
    torch.testing.assert_close(ds[0]["images"], torch.stack([processor(f) for f in clip]), rtol=0, atol=0)
    assert ds.modality_lengths()[0] == [True, True, True, False, True]


def test_lengths_equal_validations(shapes: dict, mixed: Path) -> None:
    layout = ImageLayout(28, 7, "pad", (), "spatial_unpad")  # one image_newline per image and per clip
    ds = _dataset(shapes, mixed, layout)
    settings = Settings(image_folder=str(shapes["images"]), tokenizer=str(shapes["tokenizer"]),
                        template="vicuna_v1", image_tokens=16, layout=layout, video=SAMPLING,
                        video_folder=str(mixed.parent / "videos"))  # fmt: skip
    report = validate([mixed], settings, show_progress=False)
    assert report.ok and report.videos == 2 and report.images == 2 and report.text_only == 1
    assert report.lengths == [ds.length(i) + 1 for i in range(len(ds))]  # validation counts before the shift
    assert ds.image_token_counts(4) == [6 * 4 + 1]
    short = _dataset(shapes, mixed, max_seq_length=ds.length(4) - 1)
    with pytest.raises(NevaError, match=r"id vb\).* tokens after image expansion, more than max_seq_length"):
        short.tokenize(4)


def test_workers_collate_and_packing(shapes: dict, mixed: Path) -> None:
    ds = _dataset(shapes, mixed)
    batches = list(DataLoader(ds, batch_size=5, num_workers=2, collate_fn=collate))
    batch = batches[0]
    assert batch["num_image_tiles"].tolist() == [2, 1, 1, 6]
    assert batch["image_sizes"][:, 2].tolist() == [1, 0, 0, 1] and len(batch["images"]) == 10
    assert batch["image_tokens"].tolist() == [8, 16, 16, 24]
    packed = PackedNevaDataset(ds, 512)
    rows = [packed[i] for i in range(len(packed))]
    assert sum(int(r["num_image_tiles"].sum()) for r in rows) == 10
    assert sum(int(r["image_sizes"][:, 2].sum()) for r in rows if r["image_sizes"].shape[-1] == 3) == 2  # both clips
    assert sum(len(r["cu_seqlens"]) - 1 for r in rows) == 5
