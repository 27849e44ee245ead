"""Video on the model side: a clip's frames through the tower and projector, pooled 2×2 as transformers'
LLaVA-OneVision does, placed where its ``<video>`` is; mixed image / multi-image / video / text-only batches train,
packed rows equal unpacked ones, TP=2 equals TP=1."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from dist_helpers import run_distributed
from neva_tiny import IMAGE, LLM, PATCH, VOCAB, assert_packed_equals_unpacked, loss_and_grads, vision_config

from neva_tools.data.anyres import ImageLayout, parse_pinpoints
from neva_tools.data.dataset import collate, pack_samples
from neva_tools.data.templates import IMAGE_TOKEN_INDEX
from neva_tools.data.video import clip_tokens
from neva_tools.model.merge import pack_image_features, pack_video_features

SIDE = IMAGE // PATCH  # 4 x 4 features per frame → 2 x 2 after pooling
LONG_LLM = {**LLM, "encoder_seq_length": 256, "max_position_embeddings": 256}
PINPOINTS = [[28, 56], [56, 28], [56, 56]]


def _layout(merge: str) -> ImageLayout | None:
    if merge == "none":
        return None
    aspect = "anyres" if merge == "spatial_unpad" else "pad"
    return ImageLayout(IMAGE, PATCH, aspect, parse_pinpoints(PINPOINTS if aspect == "anyres" else None, IMAGE), merge)


def test_video_features_equal_transformers_onevision() -> None:
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    g = torch.Generator().manual_seed(0)
    frames = torch.randn(5, SIDE * SIDE, 8, dtype=torch.float64, generator=g)
    newline = torch.randn(8, dtype=torch.float64, generator=g)
    hf_self = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(image_size=IMAGE, patch_size=PATCH)))
    pooled = LlavaOnevisionModel.apply_pooling(hf_self, frames)  # get_video_features: pool, flatten, one newline
    expected = torch.cat((pooled.reshape(-1, 8), newline[None]))
    ours = pack_video_features(frames, _layout("spatial_unpad"), newline)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    assert len(ours) == clip_tokens(5, _layout("spatial_unpad"), SIDE * SIDE) == 5 * 4 + 1
    plain = pack_video_features(frames, None, None)
    torch.testing.assert_close(plain, pooled.reshape(-1, 8), rtol=0, atol=0)
    assert len(plain) == clip_tokens(5, None, SIDE * SIDE) == 20


def _build(layout: ImageLayout | None, tp: int = 1, train: bool = False) -> Any:
    from neva_tools.model.neva import NevaParts, build_neva_model, freeze

    parts = NevaParts({**LONG_LLM, "tensor_model_parallel_size": tp}, VOCAB, vision_config(tp), IMAGE, PATCH,
                      image_layout=layout)  # fmt: skip
    model = build_neva_model(parts)
    freeze(model, llm=not train, vision=not train)
    return model


@pytest.mark.parametrize("merge", ["spatial_unpad", "flat", "none"])
def test_model_places_a_clips_pooled_frames(dist: None, merge: str) -> None:
    layout = _layout(merge)
    model = _build(layout)
    newline = getattr(model.vision_projection, "image_newline", None)
    hidden = LLM["hidden_size"]
    ids = torch.arange(10, 10 + 2 * 7).view(2, 7)
    ids[0, 2], ids[1, 4] = IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX  # row 0: a 3-frame clip; row 1: one image
    tiles = torch.tensor([3, 1], dtype=torch.int)
    g = torch.Generator().manual_seed(0)
    text = torch.randn(2, 7, hidden, generator=g)
    images = torch.randn(SIDE * SIDE, 4, hidden, generator=g)  # megatron-core's [seq, tiles, h]
    model._image_sizes = torch.tensor([[IMAGE, IMAGE, 1], [IMAGE, IMAGE, 0]])
    try:
        merged, _, _ = model._preprocess_data(images, text, ids, None, None, False, None, IMAGE_TOKEN_INDEX, tiles)
    finally:
        model._image_sizes = None
    features = images.transpose(0, 1)
    clip = pack_video_features(features[:3], layout, newline)
    image = features[3] if layout is None else pack_image_features(features[3:], layout, [1], [(0, 0)], newline)[0]
    rows = [[text[0, :2], clip, text[0, 3:]], [text[1, :4], image, text[1, 5:]]]
    for b, parts in enumerate(rows):
        expected = torch.cat(parts)
        torch.testing.assert_close(merged[: len(expected), b], expected, rtol=0, atol=0)
        assert not merged[len(expected) :, b].any()
    assert len(clip) == clip_tokens(3, layout, SIDE * SIDE)


def _item(seed: int, length: int, media: list[int], layout: ImageLayout | None, frames: int = 0) -> dict:
    """A dataset item as NevaDataset gives it: images (one view each) at ``media`` positions, or one clip of
    ``frames`` frames, or text only (``media`` empty)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (length,), generator=g)
    labels = torch.randint(3, VOCAB, (length,), generator=g)
    labels[:2] = -100
    for at in media:
        ids[at], labels[at] = IMAGE_TOKEN_INDEX, -100
    if frames:
        tiles, sizes = [frames], torch.tensor([[IMAGE, IMAGE, 1]])
        tokens = [clip_tokens(frames, layout, SIDE * SIDE)]
    else:
        tiles, sizes = [1] * len(media), torch.zeros(len(media), 2, dtype=torch.long)
        tokens = [SIDE * SIDE if layout is None else layout.tokens(tiled=False)] * len(media)
    return {"input_ids": ids, "labels": labels, "images": torch.randn(sum(tiles), 3, IMAGE, IMAGE, generator=g),
            "num_image_tiles": torch.tensor(tiles, dtype=torch.int), "image_sizes": sizes,
            "image_tokens": torch.tensor(tokens, dtype=torch.long), "id": f"s{seed}"}  # fmt: skip


def _samples(layout: ImageLayout | None) -> list[dict]:
    """A clip, a single image, a text-only record, two images, another clip. No sample starts with its image:
    megatron-core masks the loss of the token before an image, which packed is the previous sample's last one."""
    return [_item(1, 14, [1], layout, frames=4), _item(2, 9, [3], layout), _item(3, 11, [], layout),
            _item(4, 12, [1, 5], layout), _item(5, 10, [2], layout, frames=2)]  # fmt: skip


@pytest.mark.parametrize("merge", ["spatial_unpad", "none"])
def test_packed_mixed_media_equal_unpacked(dist: None, merge: str) -> None:
    layout = _layout(merge)
    torch.manual_seed(0)
    model = _build(layout, train=True)
    samples = _samples(layout)
    unpacked = collate(samples)
    assert unpacked["image_sizes"].shape == (5, 3) and unpacked["image_sizes"][:, 2].tolist() == [1, 0, 0, 0, 1]
    packed = collate([pack_samples(samples[:2]), pack_samples(samples[2:])])
    loss_u, _ = assert_packed_equals_unpacked(model, unpacked, packed)
    no_mask = {**packed, "cu_seqlens": [None, None]}  # the block-diagonal mask counts the clips' pooled widths
    assert abs(loss_and_grads(model, no_mask)[0] - loss_u) > 1e-4


def video_tp_steps(rank: int, world_size: int, steps: int) -> dict[str, Any]:
    """TP=world_size: the tiny NeVA (spatial_unpad), seed 1234; AdamW steps on packed mixed-media rows."""
    from neva_tools.model.parallel import destroy_distributed, init_distributed
    from neva_tools.train.module import llava_loss
    from neva_tools.train.optim import OptimSettings, build_optimizer

    init_distributed(tp=world_size, seed=1234)
    try:
        layout = _layout("spatial_unpad")
        model = _build(layout, tp=world_size, train=True)
        optimizer = build_optimizer(model, OptimSettings(lr=1e-3))
        samples = _samples(layout)
        batch = collate([pack_samples(samples[:2]), pack_samples(samples[2:])])
        losses = []
        for _ in range(steps):
            optimizer.zero_grad()
            loss, _ = llava_loss(model, batch)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return {"losses": losses, "newline": model.vision_projection.image_newline.detach().clone()}
    finally:
        destroy_distributed()


def test_tp2_equals_tp1_on_mixed_media() -> None:
    tp1 = run_distributed(video_tp_steps, 1, 2)[0]
    tp2 = run_distributed(video_tp_steps, 2, 2)
    for result in tp2:
        assert max(abs(a - b) for a, b in zip(result["losses"], tp1["losses"], strict=True)) <= 1e-5
        torch.testing.assert_close(result["newline"], tp1["newline"], atol=1e-5, rtol=0)
    assert tp1["losses"][1] < tp1["losses"][0]  # the step trained
