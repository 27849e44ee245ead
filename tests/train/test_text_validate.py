"""Text-pretraining config rules: each fires on a crafted config and names the values; the text recipes pass."""

from __future__ import annotations

from pathlib import Path

import pytest

from neva_tools.config.load import load_config
from neva_tools.train.text_validate import split_shares, text_problems

TEXT_RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes" / "text_pretrain").rglob("*.yaml"))
ON = ["model.text_pretrain.enabled=true", "model.text_pretrain.data_path=web_text_document",
      "model.mm_cfg.llm.from_pretrained=llm.nemo"]  # fmt: skip


@pytest.mark.parametrize("recipe", TEXT_RECIPES, ids=lambda p: p.name)
def test_text_recipes_pass_offline(recipe: Path) -> None:
    cfg = load_config(recipe)
    assert cfg.model.text_pretrain.enabled and text_problems(cfg, offline=True) == []


def test_mode_off_checks_nothing() -> None:
    off = ["model.text_pretrain.eval_interval=5", "model.text_pretrain.eval_iters=0"]  # a problem with the mode on
    assert text_problems(load_config(None, off)) == [] and text_problems(load_config(None, [*ON, *off])) != []


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.text_pretrain.eval_interval=5", "model.text_pretrain.eval_iters=0"],
         "eval_interval (5) must be 0 (off) or positive with model.text_pretrain.eval_iters (0) positive"),
        (["model.text_pretrain.split='99/1/0'"], r"split (99/1/0) must be up to three non-negative numbers"),
        (["model.text_pretrain.split='0,1,0'"], "split (0,1,0) gives the train split no share"),
        (["model.text_pretrain.split='100,0,0'", "model.text_pretrain.eval_interval=10"],
         "split (100,0,0) gives the validation split no share but model.text_pretrain.eval_interval is 10"),
        (["model.text_pretrain.data_path=null"], "model.text_pretrain.data_path is not set"),
        (["model.mm_cfg.llm.from_pretrained=null"], "model.mm_cfg.llm.from_pretrained is not set"),
    ],
)  # fmt: skip
def test_each_rule_names_the_values(overrides: list[str], expected: str) -> None:
    problems = text_problems(load_config(None, [*ON, *overrides]))
    assert any(expected in p for p in problems), problems


def test_file_checks_name_the_missing_files(tmp_path: Path) -> None:
    cfg = load_config(None, [*ON[:1], f"model.text_pretrain.data_path=0.5 {tmp_path}/a 0.5 {tmp_path}/b",
                             f"model.mm_cfg.llm.from_pretrained={tmp_path}/llm.nemo"])  # fmt: skip
    assert text_problems(cfg, offline=True) == []
    problems = text_problems(cfg, offline=False)
    assert any(f"prefix {tmp_path}/a has no {tmp_path}/a.bin and {tmp_path}/a.idx" in p for p in problems), problems
    assert any(f"({tmp_path}/llm.nemo) does not exist" in p for p in problems), problems


def test_split_shares() -> None:
    assert split_shares("99,1,0") == [99.0, 1.0, 0.0] and split_shares("98, 2") == [98.0, 2.0, 0.0]
