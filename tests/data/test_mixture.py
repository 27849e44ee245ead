"""Mixture planning: DATA_PATH, TRAIN_ITERS and per-dataset epochs against hand-computed values; config errors."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from neva_tools.data.mixture import format_plan, plan_from_dict, plan_mixture, plan_to_dict
from neva_tools.errors import NevaError


def build_mmap(prefix: Path, lengths: list[int]) -> Path:
    """A uint16 mmap dataset with one document per length (token values do not matter here)."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for n in lengths:
        builder.add_item(torch.arange(n, dtype=torch.int32))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return prefix


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    build_mmap(tmp_path / "a_text_document", [10, 20, 30])  # 60 tokens
    build_mmap(tmp_path / "b_text_document", [5, 15])  # 20 tokens
    build_mmap(tmp_path / "c_text_document", [7])  # its count is given in the config instead
    return tmp_path


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def base_config() -> dict[str, Any]:
    return {
        "global_batch_size": 4,
        "seq_length": 8,
        "train_tokens": 100,
        "datasets": [
            {"prefix": "a_text_document", "ratio": 1},
            {"prefix": "b_text_document.bin", "ratio": 1},  # a .bin path is taken as its prefix
            {"prefix": "c_text_document", "ratio": 2, "tokens": "1K"},
        ],
    }


def test_plan_equals_hand_computed_values(data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    from megatron.core.datasets.utils import get_blend_from_list

    with caplog.at_level(logging.WARNING):
        plan = plan_mixture(write_config(data_dir / "mix.yaml", base_config()))
    assert "ratios sum to 4, not 1" in caplog.text
    # 32 tokens per iteration; ceil(100 / 32) = 4 iterations = 128 tokens; weights 1/4, 1/4, 2/4.
    assert (plan.tokens_per_iter, plan.train_iters, plan.train_tokens, plan.requested_train_tokens) == (32, 4, 128, 100)
    a, b, c = (str(data_dir / f"{x}_text_document") for x in "abc")
    assert plan.data_path == f"0.25 {a} 0.25 {b} 0.5 {c}"
    assert [e.prefix for e in plan.datasets] == [a, b, c]
    assert [e.weight for e in plan.datasets] == [0.25, 0.25, 0.5]
    assert [e.tokens for e in plan.datasets] == [60, 20, 1000]
    assert [e.tokens_counted for e in plan.datasets] == [True, True, False]
    assert [e.consumed for e in plan.datasets] == [32, 32, 64]
    assert [e.epochs for e in plan.datasets] == pytest.approx([32 / 60, 32 / 20, 64 / 1000])
    # Megatron reads the string back as the same blend.
    assert get_blend_from_list(plan.data_path.split()) == ([a, b, c], [0.25, 0.25, 0.5])


def test_train_iters_given(data_dir: Path) -> None:
    cfg = base_config()
    del cfg["train_tokens"]
    cfg["train_iters"] = 10
    cfg["datasets"] = [{"prefix": str(data_dir / "a_text_document"), "ratio": 0.75}, cfg["datasets"][1]]
    cfg["datasets"][1]["ratio"] = 0.25
    plan = plan_from_dict(cfg, base_dir=data_dir)
    assert (plan.train_iters, plan.train_tokens, plan.requested_train_tokens) == (10, 320, None)
    assert [e.consumed for e in plan.datasets] == [240, 80]
    assert [e.epochs for e in plan.datasets] == [4.0, 4.0]
    assert plan.data_path == f"0.75 {data_dir / 'a_text_document'} 0.25 {data_dir / 'b_text_document'}"


def test_format_plan_lines_paste_into_a_shell(data_dir: Path) -> None:
    plan = plan_from_dict(base_config(), base_dir=data_dir)
    text = format_plan(plan)
    lines = text.splitlines()
    assert lines[-2] == f'DATA_PATH="{plan.data_path}"'
    assert lines[-1] == "TRAIN_ITERS=4"
    assert "a_text_document" in lines[2] and "0.533" in lines[2]  # 32 / 60 epochs
    assert all(line.startswith("#") for line in lines[:-2])  # the whole output can be sourced
    shell = subprocess.run(
        ["bash", "-c", text + '\nprintf "%s|%s" "$DATA_PATH" "$TRAIN_ITERS"'],
        check=True,
        capture_output=True,
        text=True,
    )
    assert shell.stdout == f"{plan.data_path}|4"


def test_plan_to_dict_is_json(data_dir: Path) -> None:
    plan = plan_from_dict(base_config(), base_dir=data_dir)
    data = json.loads(json.dumps(plan_to_dict(plan)))
    assert data["DATA_PATH"] == plan.data_path and data["TRAIN_ITERS"] == 4
    assert [d["consumed"] for d in data["datasets"]] == [32, 32, 64]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(lr=1e-4, micro_batch=2), r"mix\.yaml: unknown keys \['lr', 'micro_batch'\]; valid keys"),
        (lambda c: c["datasets"][1].update(weight=3), r"datasets\[1\]: unknown keys \['weight'\]"),
        (lambda c: c["datasets"][0].update(prefix="nowhere"), r"datasets\[0\]\.prefix 'nowhere': .*nowhere\.bin"),
        (lambda c: c["datasets"][2].update(ratio=-1), r"datasets\[2\]\.ratio must be a positive number, found -1"),
        (lambda c: c["datasets"][2].update(tokens="lots"), r"datasets\[2\]\.tokens must be a positive whole number"),
        (lambda c: c.update(train_iters=5), r"exactly one of train_tokens and train_iters, found both"),
        (lambda c: c.pop("seq_length"), r"missing required key 'seq_length'"),
        (
            lambda c: c["datasets"].append({"prefix": "a_text_document.idx", "ratio": 1}),
            r"datasets\[3\].* datasets\[0\]",
        ),
    ],
)
def test_config_errors_name_the_key(data_dir: Path, edit: Any, message: str) -> None:
    cfg = base_config()
    edit(cfg)
    with pytest.raises(NevaError, match=message):
        plan_mixture(write_config(data_dir / "mix.yaml", cfg))


def test_missing_prefix_names_both_files(data_dir: Path) -> None:
    cfg = base_config()
    cfg["datasets"][0]["prefix"] = "missing_text_document"
    with pytest.raises(NevaError) as info:
        plan_from_dict(cfg, base_dir=data_dir)
    assert f"{data_dir / 'missing_text_document.bin'} and {data_dir / 'missing_text_document.idx'} not found" in str(
        info.value
    )


@pytest.mark.parametrize(("value", "expected"), [("300B", 300 * 10**9), ("1.5k", 1500), (1e9, 10**9), ("2e3", 2000)])
def test_token_counts_accept_suffixes(data_dir: Path, value: Any, expected: int) -> None:
    cfg = base_config()
    cfg["train_tokens"] = value
    plan = plan_from_dict(cfg, base_dir=data_dir)
    assert plan.requested_train_tokens == expected
    assert plan.train_iters == -(-expected // 32)


def test_shell_special_characters_in_paths_survive(tmp_path: Path) -> None:
    odd = tmp_path / 'we$ird"`dir'
    odd.mkdir()
    build_mmap(odd / "x_text_document", [3])
    plan = plan_from_dict({"global_batch_size": 1, "seq_length": 2, "train_iters": 3, "datasets": [
        {"prefix": "x_text_document", "ratio": 1}]}, base_dir=odd)  # fmt: skip
    shell = subprocess.run(
        ["bash", "-c", format_plan(plan) + '\nprintf "%s" "$DATA_PATH"'], check=True, capture_output=True, text=True
    )
    assert shell.stdout == f"1 {odd / 'x_text_document'}"


# --- NEO's spelling: GLOBAL_BATCH_SIZE, SEQ_LEN, N_ROUND lists, DATA_PATH, TRAIN_ITERS ---------------------------


def test_neo_rounds_repeat_each_dataset_n_times(data_dir: Path) -> None:
    """neo/scripts/mixture_cfg.yml: weight = tokens × N, TRAIN_ITERS = Σ tokens × N / (GLOBAL_BATCH_SIZE × SEQ_LEN)."""
    text = ("GLOBAL_BATCH_SIZE: 4\nSEQ_LEN: 8\nTOKEN_COUNT_LOG_DIR: ./count_token_logs/\n\n"
            f"2_ROUND:\n  - {data_dir / 'a_text_document.bin'}\n\n0.5_ROUND:\n  - b_text_document.bin\n")  # fmt: skip
    (data_dir / "mixture_cfg.yml").write_text(text)
    plan = plan_mixture(data_dir / "mixture_cfg.yml")
    a, b = str(data_dir / "a_text_document"), str(data_dir / "b_text_document")
    # NEO's parse_mixture.py: "120 a 10 b", 130 tokens, 130 / 32 = 4.06 iterations (here: ceil, 5)
    assert [e.prefix for e in plan.datasets] == [a, b]
    assert [e.weight for e in plan.datasets] == pytest.approx([120 / 130, 10 / 130])
    assert (plan.requested_train_tokens, plan.train_iters, plan.train_tokens) == (130, 5, 160)
    assert [e.epochs for e in plan.datasets] == pytest.approx([round(160 * 120 / 130) / 60, round(160 * 10 / 130) / 20])


def test_neo_rounds_with_train_iters_and_aliases(data_dir: Path) -> None:
    plan = plan_from_dict({"GLOBAL_BATCH_SIZE": 4, "SEQ_LEN": 8, "TRAIN_ITERS": 10, "1_ROUND": ["a_text_document"],
                           "3_ROUND": ["b_text_document"]}, base_dir=data_dir)  # fmt: skip
    assert (plan.global_batch_size, plan.seq_length, plan.train_iters) == (4, 8, 10)
    assert [e.weight for e in plan.datasets] == [0.5, 0.5]  # 60 × 1 and 20 × 3


def test_data_path_blend_with_its_length(data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    a, b = data_dir / "a_text_document", data_dir / "b_text_document"
    with caplog.at_level(logging.WARNING):
        plan = plan_from_dict({"GLOBAL_BATCH_SIZE": 2, "SEQ_LEN": 8, "TRAIN_TOKENS": "1K",
                               "DATA_PATH": f"120 {a} 10 {b}.bin"}, base_dir=data_dir)  # fmt: skip
    assert "ratios sum" not in caplog.text  # DATA_PATH weights are relative, as in Megatron
    assert plan.data_path == f"{120 / 130:.8g} {a} {10 / 130:.8g} {b}"
    assert plan.train_iters == 63  # ceil(1000 / 16)
    sized = plan_from_dict({"global_batch_size": 2, "seq_length": 8, "train_iters": 1,
                            "data_path": ["a_text_document", "b_text_document"]}, base_dir=data_dir)  # fmt: skip
    assert [e.weight for e in sized.datasets] == [0.75, 0.25]  # prefixes alone: weighted by their sizes (60, 20)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (
            {"GLOBAL_BATCH_SIZE": 4, "global_batch_size": 8},
            r"GLOBAL_BATCH_SIZE \(4\) and global_batch_size \(8\) differ",
        ),
        (
            {"1_ROUND": ["a_text_document"], "datasets": [{"prefix": "b_text_document", "ratio": 1}]},
            r"exactly one way: datasets, DATA_PATH or NEO's N_ROUND keys \(found datasets and N_ROUND\)",
        ),
        ({"abc_ROUND": ["a_text_document"]}, r"abc_ROUND is not N_ROUND with N a number"),
        ({"0_ROUND": ["a_text_document"]}, r"0_ROUND repeats its datasets 0 times; it must be positive"),
        (
            {"1_ROUND": "a_text_document", "2_ROUND": ["a_text_document.bin"]},
            r"2_ROUND\[0\] \(.*\) is also 1_ROUND\[0\]",
        ),
        ({"1_ROUND": {"x": 1}}, r"1_ROUND must be a list of dataset prefixes"),
        ({"DATA_PATH": "0.5 a_text_document b_text_document", "TRAIN_ITERS": 1}, r"DATA_PATH .* mixes numbers"),
        ({"DATA_PATH": "a_text_document"}, r"exactly one of train_tokens and train_iters .*found neither"),
        ({"1_ROUND": ["missing_text_document"]}, r"1_ROUND\[0\] 'missing_text_document': .*missing_text_document\.bin"),
        ({"SEQ_LEN": None, "1_ROUND": ["a_text_document"]}, r"seq_length must be a positive whole number"),
        ({"LR": 1, "1_ROUND": ["a_text_document"]}, r"unknown keys \['LR'\]; .*NEO's GLOBAL_BATCH_SIZE, SEQ_LEN"),
    ],
)
def test_neo_config_errors_name_the_key(data_dir: Path, cfg: dict[str, Any], message: str) -> None:
    full = {"GLOBAL_BATCH_SIZE": 4, "SEQ_LEN": 8, **cfg}
    with pytest.raises(NevaError, match=message):
        plan_from_dict(full, source="mixture_cfg.yml", base_dir=data_dir)
