"""Text-pretraining data: megatron-core's BlendedMegatronDatasetBuilder/GPTDataset over our mmap files."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from dist_helpers import in_process_distributed

from neva_tools.data.gpt_blend import DatasetTokenizer, TextDataSettings, build_text_datasets, collate_text, parse_blend
from neva_tools.data.mixture import plan_mixture
from neva_tools.data.mmap import preprocess_jsonl
from neva_tools.errors import NevaError

COLOURS = ("red", "blue", "green")
SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory, sp_model: Path) -> dict[str, Any]:
    """Three mmap datasets, each about one colour only (so a sample tells which file it came from)."""
    root = tmp_path_factory.mktemp("blend")
    prefixes = {}
    for colour in COLOURS:
        src = root / f"{colour}.jsonl"
        lines = [f"The {colour} {shape} number {i} is {colour}." for i in range(40) for shape in SHAPES[:3]]
        src.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
        prefixes[colour] = preprocess_jsonl(src, root / colour, sp_model, append_eod=True).prefix
    with in_process_distributed():  # the builder uses torch.distributed (rank 0 builds first, barriers)
        yield {"root": root, "prefixes": prefixes, "tokenizer": DatasetTokenizer(sp_model), "sp": sp_model}


def _settings(corpora: dict[str, Any], data_path: Any, cache: str, **kw: Any) -> TextDataSettings:
    return TextDataSettings(data_path=data_path, seq_length=16, split="90,10,0",
                            index_cache=corpora["root"] / cache, **kw)  # fmt: skip


def test_blend_gives_the_weighted_sample_proportions(corpora: dict[str, Any]) -> None:
    import sentencepiece as spm

    weights = {"red": 0.2, "blue": 0.3, "green": 0.5}
    blend = " ".join(f"{weights[c]} {corpora['prefixes'][c]}" for c in COLOURS)
    train, valid = build_text_datasets(_settings(corpora, blend, "cache_a"), corpora["tokenizer"], 400, 40)
    assert len(train) >= 400 and len(valid) >= 40
    counts = Counter(int(train[i]["dataset_id"]) for i in range(400))
    for i, colour in enumerate(COLOURS):  # megatron-core's greedy blending: within one sample of weight × size
        assert abs(counts[i] - weights[colour] * 400) <= 1, counts
    sp = spm.SentencePieceProcessor(model_file=str(corpora["sp"]))
    for i in range(0, 400, 7):
        sample = train[i]
        text = sp.decode(sample["tokens"].tolist())
        own = COLOURS[int(sample["dataset_id"])]
        assert own in text and not any(c in text for c in COLOURS if c != own), (own, text)
        assert sample["tokens"].shape == (16,) and torch.equal(sample["tokens"][1:], sample["labels"][:-1])


def test_mixture_yaml_and_its_data_path_string_give_the_same_blend(corpora: dict[str, Any]) -> None:
    cfg = corpora["root"] / "mixture.yaml"
    cfg.write_text(json.dumps({"global_batch_size": 4, "seq_length": 16, "train_iters": 10, "datasets": [
        {"prefix": str(corpora["prefixes"]["red"]), "ratio": 0.25},
        {"prefix": str(corpora["prefixes"]["green"]), "ratio": 0.75}]}))  # fmt: skip
    from_string = parse_blend(plan_mixture(cfg).data_path)
    assert from_string == parse_blend(str(cfg))
    assert from_string == ([str(corpora["prefixes"]["red"]), str(corpora["prefixes"]["green"])], [0.25, 0.75])
    as_list = parse_blend([0.25, str(corpora["prefixes"]["red"]), 0.75, str(corpora["prefixes"]["green"])])
    assert as_list == from_string


def test_prefixes_without_weights_blend_by_size(corpora: dict[str, Any]) -> None:
    prefixes = [str(corpora["prefixes"][c]) for c in COLOURS[:2]]
    assert parse_blend(" ".join(prefixes)) == (prefixes, None)
    train, _ = build_text_datasets(_settings(corpora, prefixes, "cache_b"), corpora["tokenizer"], 100, 0)
    counts = Counter(int(train[i]["dataset_id"]) for i in range(len(train)))
    assert len(train) == 100 and abs(counts[0] - counts[1]) <= 2  # equal-sized files: equal shares


def test_train_and_valid_come_from_disjoint_documents(corpora: dict[str, Any]) -> None:
    prefix = str(corpora["prefixes"]["red"])  # one prefix: plain GPTDataset splits, no BlendedDataset
    train, valid = build_text_datasets(_settings(corpora, prefix, "cache_c"), corpora["tokenizer"], 50, 10)
    count = len(train.dataset)
    assert set(train.indices.tolist()) == set(range(round(0.9 * count)))
    assert set(valid.indices.tolist()) == set(range(round(0.9 * count), count))
    assert (corpora["root"] / "cache_c").is_dir() and any((corpora["root"] / "cache_c").glob("*-train-*.npy"))


def test_collate_renames_tokens_and_checks_the_vocabulary(corpora: dict[str, Any]) -> None:
    train, _ = build_text_datasets(_settings(corpora, str(corpora["prefixes"]["red"]), "cache_c"),
                                   corpora["tokenizer"], 50, 10)  # fmt: skip
    batch = collate_text([train[0], train[1]], vocab_size=400)
    assert set(batch) == {"input_ids", "labels", "loss_mask", "position_ids"} and batch["input_ids"].shape == (2, 16)
    top = int(batch["input_ids"].max())
    with pytest.raises(NevaError, match=rf"token id \d+ but the LLM's vocabulary has {top} ids"):
        collate_text([train[0], train[1]], vocab_size=top)


def test_valid_split_without_documents_is_named(corpora: dict[str, Any]) -> None:
    settings = TextDataSettings(data_path=str(corpora["prefixes"]["red"]), seq_length=16, split="100,0,0",
                                index_cache=corpora["root"] / "cache_d")  # fmt: skip
    with pytest.raises(NevaError, match=r"split '100,0,0' gives the validation split no documents"):
        build_text_datasets(settings, corpora["tokenizer"], 10, 4)


@pytest.mark.parametrize(
    ("data_path", "expected"),
    [
        (None, "data_path is not set"),
        ("", "data_path is empty"),
        ("0.5 {red} 0.5 /nope/web_text_document", r"prefix /nope/web_text_document has no /nope/web_text_document"
                                                  r"\.bin and /nope/web_text_document\.idx"),
        ("0.5 {red} {blue}", "mixes numbers and prefixes"),
        ("-1 {red} 2 {blue}", r"weights must be positive, found \['-1', '2'\]"),
        ("{red} {red}", "lists a prefix twice"),
    ],
)  # fmt: skip
def test_bad_data_paths_are_named(corpora: dict[str, Any], data_path: str | None, expected: str) -> None:
    if data_path is not None:
        data_path = data_path.format(**{c: p for c, p in corpora["prefixes"].items()})
    with pytest.raises(NevaError, match=expected):
        parse_blend(data_path)
