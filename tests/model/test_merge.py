"""The index_select merge of image and text embeddings equals megatron-core's LLaVAModel merge exactly."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from neva_tools.data.templates import IMAGE_TOKEN_INDEX
from neva_tools.model.merge import NevaLLaVAModel

sys.path.insert(0, str(Path(__file__).parent))
from dist_helpers import in_process_distributed
from neva_tiny import build

IMG = IMAGE_TOKEN_INDEX


@pytest.fixture(scope="module")
def model() -> Iterator[Any]:
    with in_process_distributed(tp=1):
        yield build(1)


def _case(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids [b, t]`` and ``num_image_tiles`` (tiles of each image, in order)."""
    ids = torch.arange(10, 10 + 3 * 9).view(3, 9)
    tiles = [1, 1, 1]
    if name == "one_image_each":
        ids[0, 0], ids[1, 4], ids[2, 8] = IMG, IMG, IMG
    elif name == "text_only_sample":
        ids[0, 2], ids[2, 5] = IMG, IMG
        tiles = [1, 1]
    elif name == "two_images_and_tiles":
        ids[0, 1], ids[0, 6], ids[1, 3], ids[2, 0] = IMG, IMG, IMG, IMG
        tiles = [2, 1, 1, 3]
    return ids, torch.tensor(tiles, dtype=torch.int)


@pytest.mark.parametrize("name", ["one_image_each", "text_only_sample", "two_images_and_tiles"])
@pytest.mark.parametrize("max_len", [None, 20])
def test_merge_equals_megatron(model: Any, name: str, max_len: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    from megatron.core.models.multimodal.llava_model import LLaVAModel

    assert isinstance(model, NevaLLaVAModel)
    if max_len is not None:  # combined sequences longer than the LLM's: megatron truncates
        monkeypatch.setattr(model, "_language_max_sequence_length", max_len)
    ids, tiles = _case(name)
    g = torch.Generator().manual_seed(0)
    hidden, img_len = 8, model.img_seq_len
    text = torch.randn(*ids.shape, hidden, dtype=torch.float64, generator=g)
    images = torch.randn(img_len, int(tiles.sum()), hidden, dtype=torch.float64, generator=g)
    labels = torch.randint(0, 50, ids.shape, generator=g)
    loss_mask = torch.rand(ids.shape, generator=g).round()
    results = []
    for method in (NevaLLaVAModel._preprocess_data, LLaVAModel._preprocess_data):
        t, i = text.clone().requires_grad_(), images.clone().requires_grad_()
        merged, new_labels, new_mask = method(model, i, t, ids, loss_mask, labels, False, None, IMG, tiles)
        weights = torch.randn(merged.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        (merged * weights).sum().backward()
        results.append((merged.detach(), new_labels, new_mask, t.grad, i.grad))
    assert results[0][0].shape == results[1][0].shape  # [s, b, h]
    assert results[0][0].is_contiguous()
    for ours, ref in zip(*results, strict=True):
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_kv_cache_inference_uses_megatron(model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from megatron.core.models.multimodal.llava_model import LLaVAModel

    seen = []
    monkeypatch.setattr(LLaVAModel, "_preprocess_data", lambda self, *a, **k: seen.append(a[5]) or ("parent",))
    ids, tiles = _case("one_image_each")
    text, images = torch.randn(*ids.shape, 8), torch.randn(model.img_seq_len, 3, 8)
    assert model._preprocess_data(images, text, ids, None, None, True, None, IMG, tiles) == ("parent",)
    assert seen == [True]
