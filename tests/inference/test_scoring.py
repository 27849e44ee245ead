"""Per-token NLL: with the padded vocabulary it is megatron-core's LLaVA training loss token for token; with the
true vocabulary it is the log-softmax of the gathered logits over real tokens only."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from dist_helpers import in_process_distributed

from neva_tools.data.dataset import NevaDataset, collate
from neva_tools.data.registry import DatasetSpec, DatasetUse
from neva_tools.data.templates import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from neva_tools.inference.load import LoadedNeva, load_neva
from neva_tools.inference.scoring import text_positions, token_nll


@pytest.fixture(scope="module")
def setup(neva_run: dict[str, Any]) -> Iterator[tuple[LoadedNeva, dict[str, Any]]]:
    with in_process_distributed():
        loaded = load_neva(neva_run["nemo"])
        data = neva_run["data"]
        records = json.loads(data["finetune"].read_text())[:5]
        records.append({"id": "text", "conversations": [{"from": "human", "value": "Say red."},
                                                        {"from": "gpt", "value": "red"}]})  # fmt: skip
        path = data["finetune"].with_name("scoring.json")
        path.write_text(json.dumps(records))
        spec = DatasetSpec("scoring", path, data["images"], loaded.template)
        dataset = NevaDataset([DatasetUse(spec)], loaded.tokenizer.path, loaded.image_processor, image_tokens=16)
        yield loaded, collate([dataset[i] for i in range(len(dataset))], loaded.tokenizer.pad_id)


def test_padded_vocabulary_gives_the_training_loss(setup: tuple[LoadedNeva, dict[str, Any]]) -> None:
    loaded, batch = setup
    padded = loaded.model.language_model.output_layer.weight.shape[0]
    assert padded > loaded.vocab_size  # 320 tokens padded to 384
    ours = token_nll(loaded.model, batch, padded)
    with torch.no_grad():
        loss, mask = loaded.model(batch["images"], batch["input_ids"], batch["position_ids"], None,
                                  labels=batch["labels"].clamp(min=0), loss_mask=batch["loss_mask"])  # fmt: skip
    assert int((ours != 0).sum()) == int(mask.sum()) == int(batch["loss_mask"].sum())
    torch.testing.assert_close(ours.sum(dim=1), (loss * mask).sum(dim=1), rtol=1e-6, atol=1e-5)


def test_true_vocabulary_excludes_padded_rows(setup: tuple[LoadedNeva, dict[str, Any]]) -> None:
    loaded, batch = setup
    ours = token_nll(loaded.model, batch, loaded.vocab_size)
    with torch.no_grad():
        logits = loaded.model(batch["images"], batch["input_ids"], batch["position_ids"], None,
                              runtime_gather_output=True)[0]  # fmt: skip
    positions = text_positions(batch["input_ids"], loaded.model.img_seq_len)
    logp = torch.log_softmax(logits[..., : loaded.vocab_size], dim=-1)
    labels = batch["labels"]
    want = torch.zeros_like(ours)
    for row in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            if labels[row, t] != IGNORE_INDEX:
                want[row, t] = -logp[row, positions[row, t], labels[row, t]]
    torch.testing.assert_close(ours, want, rtol=1e-6, atol=1e-5)
    assert bool(ours.sum() < token_nll(loaded.model, batch, 384).sum())  # padded rows only add probability mass


def test_text_positions() -> None:
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 5, 6], [IMAGE_TOKEN_INDEX, 2, IMAGE_TOKEN_INDEX, 7]])
    assert text_positions(ids, 4).tolist() == [[0, 4, 5, 6], [3, 4, 8, 9]]
