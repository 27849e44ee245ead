"""How long a run trains: steps from ``trainer.max_epochs`` (the smaller with max_steps), warmup from
``warmup_ratio``, and the config problems ``neva config validate`` lists for them."""

from __future__ import annotations

import logging

import pytest

from neva_tools.config.load import load_config
from neva_tools.errors import NevaError
from neva_tools.train.steps import run_length, step_problems, steps_from, warmup_steps
from neva_tools.train.validate import check_config


@pytest.mark.parametrize(
    ("max_steps", "epochs", "samples", "gbs", "expected"),
    [
        (-1, 1, 16, 32, 1),  # ceil(16 / 32)
        (-1, 2, 16, 4, 8),
        (-1, 3, 10, 4, 8),  # ceil(30 / 4)
        (-1, 0.5, 100, 8, 7),  # ceil(6.25)
        (5, 2, 16, 4, 5),  # both: the smaller
        (50, 2, 16, 4, 8),
        (7, None, None, 4, 7),
    ],
)  # fmt: skip
def test_steps_from_epochs(max_steps: int, epochs: float | None, samples: int | None, gbs: int, expected: int) -> None:
    assert steps_from(max_steps, epochs, samples, gbs) == expected


@pytest.mark.parametrize(("ratio", "steps", "expected"), [(0.03, 1, 1), (0.03, 100, 3), (0.03, 101, 4), (0.0, 9, 0),
                                                           (0.25, 8, 2)])  # fmt: skip
def test_warmup_ratio_rounds_up(ratio: float, steps: int, expected: int) -> None:
    cfg = load_config(None, [f"model.optim.sched.warmup_ratio={ratio}"])
    assert warmup_steps(cfg, steps) == expected
    assert warmup_steps(load_config(None, ["model.optim.sched.warmup_steps=5"]), steps) == 5


def test_run_length_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_config(None, ["trainer.max_steps=-1", "trainer.max_epochs=2", "model.global_batch_size=4",
                             "model.optim.sched.warmup_ratio=0.25"])  # fmt: skip
    with caplog.at_level(logging.INFO, logger="neva_tools.train.steps"):
        length = run_length(cfg, 16)
    assert (length.max_steps, length.warmup_steps) == (8, 2)
    assert [r.getMessage() for r in caplog.records] == [
        "trainer.max_epochs 2 over 16 samples at global batch 4: 8 optimizer steps",
        "model.optim.sched.warmup_ratio 0.25 of 8 steps: 2 warmup steps",
    ]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["trainer.max_steps=-1"], "trainer.max_steps is -1 (derive the steps from the epochs) but trainer.max_epochs "
                                   "is not set"),
        (["model.optim.sched.warmup_ratio=0.1", "model.optim.sched.warmup_steps=3"],
         "warmup_steps (3) and warmup_ratio (0.1) are both set: keep one"),
        (["model.optim.sched.warmup_ratio=0.5", "model.optim.sched.constant_steps=60"],
         "warmup_steps (50) + constant_steps (60) exceed trainer.max_steps (100)"),
        (["model.text_pretrain.enabled=true", "trainer.max_epochs=1"],
         "trainer.max_epochs (1) counts passes over NeVA data; text pretraining"),
        (["model.mm_cfg.freeze_mm_mlp_adapter=true"], "are all true: nothing would train"),
    ],
)  # fmt: skip
def test_config_problems_name_the_values(overrides: list[str], expected: str) -> None:
    cfg = load_config(None, overrides)
    assert any(expected in p for p in check_config(cfg, offline=True)), check_config(cfg, offline=True)
    assert any(expected in p for p in step_problems(cfg)) or "nothing would train" in expected


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("trainer.max_steps", 0, "trainer.max_steps (0) must be a positive number of optimizer steps, or -1"),
        ("trainer.max_epochs", 0, "trainer.max_epochs (0) must be positive"),
        ("model.optim.sched.warmup_ratio", 1.0, "warmup_ratio (1) must be in [0, 1)"),
        ("model.optim.sched.warmup_ratio", -0.1, "warmup_ratio (-0.1) must be in [0, 1)"),
    ],
)  # fmt: skip
def test_step_rules_name_values_set_after_loading(key: str, value: float, expected: str) -> None:
    """The loader refuses these values already (``neva_tools.config.values``: tests/config/test_values.py); the step
    rules still name them in a config changed after loading."""
    from omegaconf import OmegaConf

    with pytest.raises(NevaError, match=key.replace(".", r"\.")):
        load_config(None, [f"{key}={value}"])
    cfg = load_config(None, [])
    OmegaConf.update(cfg, key, value)
    assert any(expected in p for p in step_problems(cfg)), step_problems(cfg)


VALID = [["trainer.max_steps=-1", "trainer.max_epochs=1"],
         ["trainer.max_epochs=2", "model.optim.sched.warmup_ratio=0.03"], ["trainer.max_epochs=-1"],
         ["model.optim.sched.warmup_ratio=0"],
         ["model.mm_cfg.freeze_mm_mlp_adapter=true", "model.mm_cfg.llm.freeze=false"]]  # fmt: skip


@pytest.mark.parametrize("overrides", VALID)
def test_valid_settings_pass(overrides: list[str]) -> None:
    assert check_config(load_config(None, overrides), offline=True) == []


def test_run_length_refuses_what_validation_refuses() -> None:
    with pytest.raises(NevaError, match=r"trainer\.max_epochs is not set"):
        run_length(load_config(None, ["trainer.max_steps=-1"]), 16)
    with pytest.raises(NevaError, match=r"warmup \(1 steps\) \+ constant_steps \(3\) exceed the run's 1 optimizer"):
        run_length(load_config(None, ["trainer.max_steps=-1", "trainer.max_epochs=1", "model.global_batch_size=32",
                                      "model.optim.sched.warmup_ratio=0.03",
                                      "model.optim.sched.constant_steps=3"]), 16)  # fmt: skip
