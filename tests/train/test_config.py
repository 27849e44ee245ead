"""Config precedence base → recipe → CLI, struct mode with suggestions."""

from __future__ import annotations

from pathlib import Path

import pytest

from neva_tools.errors import NevaError
from neva_tools.train.config import load_config


def test_precedence_base_recipe_cli(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "trainer:\n  max_steps: 7\nmodel:\n  optim:\n    lr: 1.0e-3\n  mm_cfg:\n    llm:\n      model_type: mistral\n"
    )
    base = load_config()
    assert base.trainer.max_steps == 100 and base.model.data.conv_template == "llama_2"
    cfg = load_config(recipe)
    assert cfg.trainer.max_steps == 7 and cfg.model.optim.lr == 1e-3
    assert cfg.model.data.conv_template == "mistral"  # interpolation follows the recipe
    cfg = load_config(recipe, ["trainer.max_steps=9"])
    assert cfg.trainer.max_steps == 9 and cfg.model.optim.lr == 1e-3


def test_typos_fail_with_a_suggestion(tmp_path: Path) -> None:
    with pytest.raises(NevaError, match=r"unknown config key 'model.optim.lrr'; did you mean 'model.optim.lr'\?"):
        load_config(overrides=["model.optim.lrr=1"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  mm_cfg:\n    vision_encodr:\n      freeze: false\n")
    with pytest.raises(NevaError, match=r"r\.yaml: unknown config key 'model.mm_cfg.vision_encodr.freeze'"):
        load_config(recipe)
    with pytest.raises(NevaError, match="key=value"):
        load_config(overrides=["trainer.max_steps"])
    cfg = load_config()
    with pytest.raises(Exception, match="lrr"):
        cfg.model.optim.lrr = 1  # struct mode
