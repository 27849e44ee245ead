"""A mixture YAML as model.text_pretrain.data_path sets trainer.max_steps, model.global_batch_size and seq_length."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import DictConfig, OmegaConf

from neva_tools.errors import NevaError
from neva_tools.train.text_mixture import apply_mixture, mixture_file


@pytest.fixture
def mixture(tmp_path: Path) -> Path:
    """A NEO mixture YAML over one 200-token dataset: 1_ROUND, GLOBAL_BATCH_SIZE 4, SEQ_LEN 8 → TRAIN_ITERS 7."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(tmp_path / "web_text_document.bin"), dtype=np.uint16)
    for _ in range(10):
        builder.add_item(torch.arange(20, dtype=torch.int32))
        builder.end_document()
    builder.finalize(str(tmp_path / "web_text_document.idx"))
    path = tmp_path / "mixture_cfg.yml"
    path.write_text("GLOBAL_BATCH_SIZE: 4\nSEQ_LEN: 8\n1_ROUND:\n  - web_text_document.bin\n")
    return path


def _cfg(mixture: Path, *overrides: str) -> DictConfig:
    from neva_tools.config.load import load_config

    return load_config(None, ["model.text_pretrain.enabled=true", f"model.text_pretrain.data_path={mixture}",
                              *overrides])  # fmt: skip


def test_the_yaml_values_replace_the_defaults(mixture: Path) -> None:
    cfg = _cfg(mixture)
    assert (cfg.trainer.max_steps, cfg.model.global_batch_size) == (100, 1)  # conf/neva_config.yaml's defaults
    applied = apply_mixture(cfg)
    assert applied.trainer.max_steps == 7  # ceil(200 / (4 × 8))
    assert applied.model.global_batch_size == 4
    assert applied.model.text_pretrain.seq_length == 8
    assert cfg.trainer.max_steps == 100  # the caller's config is left alone
    assert OmegaConf.is_struct(applied)


def test_equal_values_set_explicitly_are_fine(mixture: Path) -> None:
    cfg = _cfg(mixture, "trainer.max_steps=7", "model.global_batch_size=4", "model.text_pretrain.seq_length=8")
    assert apply_mixture(cfg).trainer.max_steps == 7


def test_a_different_explicit_value_is_an_error_naming_both(mixture: Path) -> None:
    cfg = _cfg(mixture, "trainer.max_steps=40", "model.text_pretrain.seq_length=32")
    with pytest.raises(NevaError) as info:
        apply_mixture(cfg)
    message = str(info.value)
    assert f"trainer.max_steps is 40 (recipe or command line) but {mixture} gives TRAIN_ITERS 7" in message
    assert f"model.text_pretrain.seq_length is 32 (recipe or command line) but {mixture} gives SEQ_LEN 8" in message
    assert "model.global_batch_size" not in message  # still at its default: the YAML's value applies


def test_text_problems_report_the_conflict(mixture: Path) -> None:
    from neva_tools.train.text_validate import text_problems

    problems = text_problems(_cfg(mixture, "model.global_batch_size=16"), offline=False)
    assert any("model.global_batch_size is 16 (recipe or command line)" in p and "GLOBAL_BATCH_SIZE 4" in p
               for p in problems), problems  # fmt: skip


def test_a_blend_string_changes_nothing(mixture: Path) -> None:
    cfg = OmegaConf.create(
        {
            "trainer": {"max_steps": 3},
            "model": {
                "global_batch_size": 2,
                "text_pretrain": {"seq_length": 5, "data_path": f"1 {mixture.parent}/web_text_document"},
            },
        }
    )
    assert apply_mixture(cfg, defaults={}) is cfg
    assert mixture_file("0.5 a.yaml 0.5 b") is None and mixture_file(["mix.yml"]) == Path("mix.yml")
