"""The training Dataset and collate: what LLaVAModel consumes; workers; packing."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from neva_tools.data.dataset import NevaDataset, PackedNevaDataset, collate
from neva_tools.data.images import ImageProcessor
from neva_tools.data.registry import DatasetSpec, DatasetUse
from neva_tools.data.templates import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from neva_tools.data.validate import Settings, validate
from neva_tools.tokenizer.text import TextTokenizer


def _dataset(shapes: dict, split: str, template: str, **kwargs: object) -> NevaDataset:
    use = DatasetUse(DatasetSpec(split, shapes[split], shapes["images"], template))
    return NevaDataset([use], shapes["tokenizer"], ImageProcessor(image_size=28), image_tokens=4, **kwargs)


def test_item_is_shifted_and_supervises_only_the_answer(shapes: dict) -> None:
    ds = _dataset(shapes, "finetune", "vicuna_v1")
    assert len(ds) == 24
    item = ds[0]
    ids, labels = item["input_ids"], item["labels"]
    assert ids.shape == labels.shape and item["images"].shape == (1, 3, 28, 28)
    assert (ids == IMAGE_TOKEN_INDEX).sum() == 1
    supervised = labels[labels != IGNORE_INDEX].tolist()
    tok = TextTokenizer(shapes["tokenizer"])
    answer = ds.items[0].record.raw["conversations"][1]["value"]
    assert supervised[-1] == tok.eos_id and tok.decode(supervised[:-1]).strip() == answer
    # shifted: the label at position t is the input at t + 1
    full = torch.cat([ids, labels[-1:]])
    keep = labels != IGNORE_INDEX
    assert torch.equal(full[1:][keep], labels[keep])


def test_collate_and_workers(shapes: dict) -> None:
    ds = _dataset(shapes, "finetune", "vicuna_v1")
    tok = TextTokenizer(shapes["tokenizer"])
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=lambda b: collate(b, tok.pad_id))
    batches = list(loader)
    assert len(batches) == 6
    batch = batches[0]
    b, s = batch["input_ids"].shape
    assert batch["labels"].shape == (b, s) and batch["loss_mask"].shape == (b, s)
    assert batch["images"].shape == (4, 3, 28, 28) and batch["num_image_tiles"].tolist() == [1, 1, 1, 1]
    assert torch.equal(batch["loss_mask"].bool(), batch["labels"] != IGNORE_INDEX)
    assert sum(len(x["ids"]) for x in batches) == 24


def test_sampling_and_template_from_registry_entry(shapes: dict) -> None:
    use = DatasetUse(DatasetSpec("pre", shapes["pretrain"], shapes["images"], "plain"), percent=50)
    ds = NevaDataset([use], shapes["tokenizer"], ImageProcessor(image_size=28), image_tokens=4, seed=3)
    assert len(ds) == 4
    item = ds[0]
    assert item["input_ids"][1] == IMAGE_TOKEN_INDEX  # plain: BOS <image> caption EOS


def test_packed_dataset_keeps_samples_apart(shapes: dict) -> None:
    base = _dataset(shapes, "finetune", "vicuna_v1")
    lengths = [base.length(i) for i in range(len(base))]
    packed = PackedNevaDataset(base, max_seq_length=3 * max(lengths))
    assert len(packed) < len(base)
    seen = 0
    for i in range(len(packed)):
        item = packed[i]
        cu = item["cu_seqlens"].tolist()
        n = len(cu) - 1
        seen += n
        assert item["images"].shape[0] == n == (item["input_ids"] == IMAGE_TOKEN_INDEX).sum()
        assert all(item["position_ids"][start] == 0 for start in cu[:-1])
        assert cu[-1] == len(item["input_ids"])
    assert seen == len(base)


def test_validate_checks_lengths_with_template(shapes: dict) -> None:
    settings = Settings(image_folder=str(shapes["images"]), tokenizer=str(shapes["tokenizer"]),
                        template="vicuna_v1", max_seq_length=40, image_tokens=16)  # fmt: skip
    report = validate([shapes["finetune"]], settings)
    assert report.length_stats()["max"] > 40
    too_long = [p for p in report.problems if p.kind == "too_long"]
    assert too_long and "images × 16" in too_long[0].found
    chatml = Settings(image_folder=str(shapes["images"]), tokenizer=str(shapes["tokenizer"]), template="chatml")
    report = validate([shapes["finetune"]], chatml)
    assert {p.kind for p in report.problems} == {"template_error"} and "<|im_start|>" in report.problems[0].found
