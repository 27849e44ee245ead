"""Every recipe under recipes/ (found recursively) loads over the base config and passes offline validation;
each validation rule fires on a crafted config and names the values."""

from __future__ import annotations

from pathlib import Path

import pytest

from neva_tools.train.config import load_config
from neva_tools.train.validate import check_config

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").rglob("*.yaml"))


def test_recipes_are_found() -> None:
    assert len(RECIPES) >= 4


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_loads_and_validates_offline(recipe: Path) -> None:
    text = recipe.read_text()
    assert text.startswith("#") and "Launch" in text and "Override example" in text  # the header comment
    cfg = load_config(recipe)
    assert check_config(cfg, offline=True) == []


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.global_batch_size=3", "model.micro_batch_size=2"], "global_batch_size (3) must be a multiple of "
                                                                    "model.micro_batch_size (2)"),
        (["model.pipeline_model_parallel_size=2"], "pipeline_model_parallel_size (2) must be 1"),
        (["model.data.conv_template=alpaca"], "conv_template (alpaca) is not one of plain"),
        (["model.mm_cfg.mm_mlp_adapter_type=qformer"], "mm_mlp_adapter_type (qformer) is not one of"),
        (["model.data.image_aspect_ratio=crop"], "image_aspect_ratio (crop) is not one of"),
        (["trainer.precision=8"], "trainer.precision (8) is not one of"),
        (["model.optim.sched.warmup_steps=90", "model.optim.sched.constant_steps=20"],
         "warmup_steps (90) + constant_steps (20) exceed trainer.max_steps (100)"),
        (["model.optim.sched.min_lr=1.0"], "min_lr (1.0) is larger than model.optim.lr (0.002)"),
        (["model.mm_cfg.llm.freeze=false"], "without model.mm_cfg.pretrain_mm_mlp_adapter"),
    ],
)  # fmt: skip
def test_each_rule_names_the_values(overrides: list[str], expected: str) -> None:
    problems = check_config(load_config(None, overrides), offline=True)
    assert any(expected in p for p in problems), problems


def test_file_checks(llama_hf: Path, tmp_path: Path) -> None:
    from neva_tools.convert.hf_to_nemo import convert_hf_to_nemo

    nemo = tmp_path / "llm.nemo"
    convert_hf_to_nemo(str(llama_hf), nemo)
    base = [f"model.mm_cfg.llm.from_pretrained={nemo}", "model.mm_cfg.vision_encoder.from_pretrained=x",
            "model.data.data_path=y"]  # fmt: skip
    assert check_config(load_config(None, base), offline=False) == []
    problems = check_config(load_config(None, [*base, "model.tensor_model_parallel_size=4"]), offline=False)
    assert any("tensor_model_parallel_size (4) must divide num_query_groups (2)" in p for p in problems)
    problems = check_config(load_config(None, [*base, "model.mm_cfg.llm.model_type=chatml"]), offline=False)
    assert any("lacks ['<|im_start|>', '<|im_end|>']" in p for p in problems), problems
    missing = check_config(load_config(None, ["model.mm_cfg.llm.from_pretrained=/nope.nemo"]), offline=False)
    assert any("(/nope.nemo) does not exist" in p for p in missing)
