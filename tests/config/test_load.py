"""Config precedence base → recipe → CLI, struct mode with suggestions; run directory, resume point, devices."""

from __future__ import annotations

from pathlib import Path

import pytest

from neva_tools.config.load import load_config
from neva_tools.errors import NevaError


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
    with pytest.raises(NevaError, match=r"command line: model.optim.lrr \(did you mean 'model.optim.lr'\?\)"):
        load_config(overrides=["model.optim.lrr=1"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  mm_cfg:\n    vision_encodr:\n      freeze: false\n")
    with pytest.raises(NevaError, match=r"r\.yaml: model.mm_cfg.vision_encodr.freeze \(did you mean"):
        load_config(recipe)
    with pytest.raises(NevaError, match="key=value"):
        load_config(overrides=["trainer.max_steps"])
    cfg = load_config()
    with pytest.raises(Exception, match="lrr"):
        cfg.model.optim.lrr = 1  # struct mode


def test_run_directory_and_resume_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from neva_tools.train import checkpoint
    from neva_tools.train.paths import resume_checkpoint, run_directory

    cfg = load_config(None, [f"exp_manager.exp_dir={tmp_path}", "name=r1"])
    assert run_directory(cfg) == tmp_path / "r1" and resume_checkpoint(cfg, run_directory(cfg)) is None
    cfg = load_config(None, [f"exp_manager.explicit_log_dir={tmp_path / 'exact'}"])
    assert run_directory(cfg) == tmp_path / "exact"
    assert load_config(None, ["exp_manager.exp_dir=null"]).exp_manager.exp_dir == "runs"  # NeMo's null: the default
    strict = load_config(None, [f"exp_manager.exp_dir={tmp_path}", "exp_manager.resume_ignore_no_checkpoint=false"])
    with pytest.raises(NevaError, match=r"holds no complete checkpoint; set exp_manager\.resume_ignore_no_checkpoint"):
        resume_checkpoint(strict, run_directory(strict))
    step = tmp_path / "neva" / "checkpoints" / "step=4"
    step.mkdir(parents=True)
    (step / "metadata.json").write_text("{}")
    with pytest.raises(NevaError, match=r"no checkpoint in .* can be resumed from \(step=4: "):
        resume_checkpoint(strict, run_directory(strict))  # an empty metadata.json is no usable checkpoint
    monkeypatch.setattr(checkpoint, "problems", lambda directory: [])  # this test is about the choice, not the files
    assert resume_checkpoint(strict, run_directory(strict)) == step
    given = load_config(None, [f"exp_manager.resume_from_checkpoint={step}", "exp_manager.resume_if_exists=false"])
    assert resume_checkpoint(given, tmp_path) == step
    bad = load_config(None, [f"exp_manager.resume_from_checkpoint={step.parent / 'step=9'}"])
    with pytest.raises(NevaError, match=r"step=9\) is not a complete checkpoint directory .*: step=4$"):
        resume_checkpoint(bad, tmp_path)


def test_trainer_devices_against_the_launcher() -> None:
    from neva_tools.train.validate import devices_problems

    assert devices_problems(load_config(), 4) == ([], 4)  # null: the launcher's
    assert devices_problems(load_config(None, ["trainer.devices=2"]), None) == ([], 2)  # used for the batch check
    problems, _ = devices_problems(load_config(None, ["trainer.devices=2"]), 4)
    assert problems and "trainer.devices is 2 but the launcher runs 4 processes per node" in problems[0]
    assert devices_problems(load_config(None, ["trainer.devices=auto"]), 3) == ([], 3)
    assert devices_problems(load_config(None, ["trainer.devices=0"]), 3)[0]


def test_config_validate_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """0 valid, 1 problems listed, 2 the config cannot be loaded (every unknown key named); from any directory."""
    from neva_tools.cli.main import main

    monkeypatch.chdir(tmp_path)
    assert main(["config", "validate", "--offline", "tiny_cpu/stage1_pretrain.yaml", "--devices", "2"]) == 0
    assert main(["config", "validate", "--offline", "tiny_cpu/stage1_pretrain.yaml", "trainer.devices=4",
                 "--devices", "2"]) == 1  # fmt: skip
    assert "trainer.devices is 4 but the launcher runs 2 processes per node" in capsys.readouterr().out
    assert main(["config", "validate", "--offline", "tiny_cpu/stage1_pretrain.yaml", "model.optim.lrr=1",
                 "trainer.gpus=2"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "2 unknown config key(s)" in err and "model.optim.lrr" in err and "trainer.gpus" in err
