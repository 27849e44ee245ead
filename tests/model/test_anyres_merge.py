"""AnyRes model side: tile features laid out as transformers' LLaVA-NeXT / OneVision do, placed by megatron-core's
merge; packing with mixed tile counts equals unpacked rows; TP=2 equals TP=1."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from dist_helpers import in_process_distributed, run_distributed
from neva_tiny import IMAGE, LLM, PATCH, VOCAB, assert_packed_equals_unpacked, loss_and_grads, vision_config

from neva_tools.data.anyres import ImageLayout, parse_pinpoints
from neva_tools.data.dataset import collate, pack_samples
from neva_tools.data.templates import IMAGE_TOKEN_INDEX
from neva_tools.errors import NevaError
from neva_tools.model.merge import pack_image_features

SIDE = IMAGE // PATCH  # 4 x 4 features per tile
PINPOINTS = [[28, 56], [56, 28], [56, 56], [28, 84], [84, 28]]  # [height, width]
#: (height, width) of images: wide, tall, square, tiny, odd; each picks another grid or unpads otherwise.
SIZES = [(30, 60), (61, 30), (50, 50), (12, 9), (41, 101), (90, 17)]
LONG_LLM = {**LLM, "encoder_seq_length": 256, "max_position_embeddings": 256}


def _layout(merge: str = "spatial_unpad", aspect: str = "anyres", pinpoints: object = PINPOINTS) -> ImageLayout:
    return ImageLayout(IMAGE, PATCH, aspect, parse_pinpoints(pinpoints, IMAGE), merge)


def _hf_self(layout: ImageLayout) -> Any:
    """What transformers' ``pack_image_features`` reads from ``self``."""
    config = SimpleNamespace(vision_config=SimpleNamespace(image_size=IMAGE, patch_size=PATCH),
                             image_grid_pinpoints=[list(p) for p in layout.pinpoints])  # fmt: skip
    return SimpleNamespace(config=config)


def _features(layout: ImageLayout, sizes: list[tuple[int, int]], tiled: bool = True, hidden: int = 8) -> Any:
    tiles = [layout.num_tiles(h, w, tiled) for h, w in sizes]
    g = torch.Generator().manual_seed(len(sizes))
    return tiles, torch.randn(sum(tiles), SIDE * SIDE, hidden, dtype=torch.float64, generator=g)


def test_unpad_layout_equals_transformers_llava_next() -> None:
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

    layout = _layout()
    tiles, feats = _features(layout, SIZES)
    newline = torch.randn(8, dtype=torch.float64)
    ours = pack_image_features(feats, layout, tiles, SIZES, newline)
    theirs, lens = LlavaNextModel.pack_image_features(_hf_self(layout), list(feats.split(tiles)), torch.tensor(SIZES),
                                                      "full", image_newline=newline)  # fmt: skip
    assert len(ours) == len(theirs) == len(SIZES)
    for size, a, b in zip(SIZES, ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=str(size))
    assert lens.tolist() == [layout.tokens(h, w) for h, w in SIZES]  # the count the data side uses
    one_view = pack_image_features(feats[:2], layout, [1, 1], [(0, 0)] * 2, newline)  # a multi-image sample
    single, _ = LlavaNextModel.pack_image_features(_hf_self(layout), [feats[:1], feats[1:2]], torch.zeros(2, 2),
                                                   "full", image_newline=newline)  # fmt: skip
    torch.testing.assert_close(torch.cat(one_view), torch.cat(single), rtol=0, atol=0)
    assert len(one_view[0]) == layout.tokens(tiled=False) == SIDE**2 + 1


def test_anyres_max_layout_equals_transformers_llava_onevision() -> None:
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    layout = _layout(aspect="anyres_max_2", pinpoints="(1x1),...,(6x6)")
    sizes = [(168, 168), (100, 168), (30, 60), (28, 28), (170, 40)]
    assert sum(layout.unpadded(h, w).resize is not None for h, w in sizes) >= 3  # the shrinking is exercised
    tiles, feats = _features(layout, sizes)
    newline = torch.randn(8, dtype=torch.float64)
    ours = pack_image_features(feats, layout, tiles, sizes, newline)
    theirs, lens = LlavaOnevisionModel.pack_image_features(_hf_self(layout), list(feats.split(tiles)),
                                                           torch.tensor(sizes), image_newline=newline,
                                                           vision_aspect_ratio="anyres_max_2")  # fmt: skip
    for size, a, b in zip(sizes, ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=str(size))
    assert lens.tolist() == [layout.tokens(h, w) for h, w in sizes]


def test_flat_and_spatial_layouts() -> None:
    """LLaVA-NeXT's flat (tiles one after the other) and spatial (the grid row by row, no unpad, no newline)."""
    sizes = [(30, 60), (61, 30)]
    for merge in ("flat", "spatial"):
        layout = _layout(merge)
        tiles, feats = _features(layout, sizes)
        ours = pack_image_features(feats, layout, tiles, sizes, None)
        for (h, w), image, packed in zip(sizes, feats.split(tiles), ours, strict=True):
            rows, cols = layout.grid(h, w)
            grid = image[1:].view(rows, cols, SIDE, SIDE, -1).permute(0, 2, 1, 3, 4).flatten(0, 3)  # LLaVA-NeXT
            expected = image.flatten(0, 1) if merge == "flat" else torch.cat((image[0], grid))
            torch.testing.assert_close(packed, expected, rtol=0, atol=0)
            assert len(packed) == layout.tokens(h, w) == len(image) * SIDE**2
    spatial = _layout("spatial")
    tiles, feats = _features(spatial, [(50, 50)])
    assert not torch.equal(pack_image_features(feats, spatial, tiles, [(50, 50)], None)[0], feats.flatten(0, 1))
    with pytest.raises(NevaError, match="has 3 tiles; its 2x2 grid and base view make 5"):
        pack_image_features(feats[:3], spatial, [3], [(50, 50)], None)


def _build(layout: ImageLayout, tp: int = 1, train: bool = False) -> Any:
    from neva_tools.model.neva import NevaParts, build_neva_model, freeze

    parts = NevaParts({**LONG_LLM, "tensor_model_parallel_size": tp}, VOCAB, vision_config(tp), IMAGE, PATCH,
                      image_layout=layout)  # fmt: skip
    model = build_neva_model(parts)
    freeze(model, llm=not train, vision=not train)
    return model


@pytest.fixture(scope="module")
def dist() -> Iterator[None]:
    with in_process_distributed(tp=1):
        yield


@pytest.mark.parametrize("merge", ["spatial_unpad", "spatial", "flat"])
def test_model_places_each_images_laid_out_features(dist: None, merge: str) -> None:
    """flat is megatron-core's own tile placement; the spatial layouts go through pack_image_features."""
    from neva_tools.model.neva import freeze

    layout = _layout(merge)
    model = _build(layout)
    newline = getattr(model.vision_projection, "image_newline", None)
    assert (newline is not None) == (merge == "spatial_unpad")
    if newline is not None:
        assert newline.shape == (LLM["hidden_size"],) and newline.requires_grad  # trained with the projector...
        freeze(model, llm=False, vision=True, projector=True)
        assert not newline.requires_grad  # ... and frozen with it
    hidden = LLM["hidden_size"]
    ids = torch.arange(10, 10 + 2 * 7).view(2, 7)
    ids[0, 2], ids[1, 0], ids[1, 4] = IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX
    sizes = [(30, 60), (0, 0), (0, 0)]  # row 0: one tiled image; row 1: two one-view images
    tiles = torch.tensor([layout.num_tiles(30, 60), 1, 1], dtype=torch.int)
    g = torch.Generator().manual_seed(0)
    text = torch.randn(2, 7, hidden, generator=g)
    images = torch.randn(SIDE * SIDE, int(tiles.sum()), hidden, generator=g)  # megatron-core's [seq, tiles, h]
    model._image_sizes = torch.tensor(sizes)
    try:
        merged, _, _ = model._preprocess_data(images, text, ids, None, None, False, None, IMAGE_TOKEN_INDEX, tiles)
    finally:
        model._image_sizes = None
    packed = pack_image_features(images.transpose(0, 1), layout, tiles.tolist(), sizes, newline)
    rows = [[text[0, :2], packed[0], text[0, 3:]], [packed[1], text[1, 1:4], packed[2], text[1, 5:]]]
    for b, parts in enumerate(rows):
        expected = torch.cat(parts)
        torch.testing.assert_close(merged[: len(expected), b], expected, rtol=0, atol=0)
        assert not merged[len(expected) :, b].any()  # padding after the shorter row
    assert merged.shape[0] == max(sum(len(p) for p in parts) for parts in rows)
    if merge != "flat":
        with pytest.raises(NevaError, match="tiled images need their sizes"):
            model._preprocess_data(images, text, ids, None, None, False, None, IMAGE_TOKEN_INDEX, tiles)


def _item(seed: int, length: int, image_at: list[int], sizes: list[tuple[int, int]], layout: ImageLayout) -> dict:
    """A dataset item: shifted ids/labels with one image token per image, and the images' tiles as NevaDataset
    gives them (a single image tiled, several images one view each)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (length,), generator=g)
    labels = torch.randint(3, VOCAB, (length,), generator=g)
    labels[:2] = -100
    for at in image_at:
        ids[at], labels[at] = IMAGE_TOKEN_INDEX, -100
    tiled = layout.tiles_images(len(sizes))
    tiles = [layout.num_tiles(h, w, tiled) for h, w in sizes]
    return {"input_ids": ids, "labels": labels, "images": torch.randn(sum(tiles), 3, IMAGE, IMAGE, generator=g),
            "num_image_tiles": torch.tensor(tiles, dtype=torch.int), "image_sizes": torch.tensor(sizes).view(-1, 2),
            "image_tokens": torch.tensor([layout.tokens(h, w, tiled) for h, w in sizes]), "id": f"s{seed}"}  # fmt: skip


def _samples(layout: ImageLayout) -> list[dict]:
    return [_item(1, 14, [1], [(30, 60)], layout), _item(2, 9, [3], [(61, 30)], layout),
            _item(3, 12, [0, 5], [(50, 50), (20, 40)], layout), _item(4, 10, [2], [(50, 50)], layout)]  # fmt: skip


@pytest.mark.parametrize("merge", ["spatial_unpad", "flat"])
def test_packed_mixed_tiles_equal_unpacked(dist: None, merge: str) -> None:
    layout = _layout(merge)
    torch.manual_seed(0)
    model = _build(layout, train=True)
    samples = _samples(layout)
    assert len({int(s["num_image_tiles"].sum()) for s in samples}) >= 3  # mixed tile counts
    unpacked = collate(samples)
    packed = collate([pack_samples(samples[:2]), pack_samples(samples[2:])])
    loss_u, grads_u = assert_packed_equals_unpacked(model, unpacked, packed)
    if merge == "spatial_unpad":
        assert grads_u["vision_projection.image_newline"].abs().sum() > 0  # trained with the projector
    # and the mask matters: packed rows without it (plain causal over the row) give another loss
    no_mask = {**packed, "cu_seqlens": [None, None]}
    assert abs(loss_and_grads(model, no_mask)[0] - loss_u) > 1e-4


def anyres_tp_steps(rank: int, world_size: int, steps: int) -> dict[str, Any]:
    """TP=world_size: the tiny NeVA with spatial_unpad AnyRes, seed 1234; AdamW steps on mixed-tile rows."""
    from neva_tools.model.parallel import destroy_distributed, init_distributed
    from neva_tools.train.module import llava_loss
    from neva_tools.train.optim import OptimSettings, build_optimizer

    init_distributed(tp=world_size, seed=1234)
    try:
        layout = _layout()
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
        newline = model.vision_projection.image_newline.detach().clone()
        return {"losses": losses, "newline": newline, "bias": model.vision_projection.encoder.linear_fc2.bias.detach()}
    finally:
        destroy_distributed()


def test_tp2_equals_tp1() -> None:
    tp1 = run_distributed(anyres_tp_steps, 1, 2)[0]
    tp2 = run_distributed(anyres_tp_steps, 2, 2)
    for result in tp2:
        assert max(abs(a - b) for a, b in zip(result["losses"], tp1["losses"], strict=True)) <= 1e-5
        torch.testing.assert_close(result["newline"], tp1["newline"], atol=1e-5, rtol=0)
        torch.testing.assert_close(result["bias"], tp1["bias"], atol=1e-5, rtol=0)
    assert tp1["losses"][1] != tp1["losses"][0]  # the steps trained something
    torch.testing.assert_close(tp2[0]["newline"], tp2[1]["newline"], rtol=0, atol=0)  # replicated on every rank
