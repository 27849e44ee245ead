"""``neva train`` checks every record before it builds the model (``neva_tools.train.data_check``), and ``neva config
validate`` runs the same check when the files are there.

The tiny assets of the inference tests: a 28 px / 7 px CLIP (16 tokens per image), a 320-piece tokenizer, a 2-layer
LLaMA ``.nemo`` and the synthetic finetune split (vicuna_v1, ``max_seq_length`` 256). A 336 px / 14 px tower would
make every image record 576+ tokens: the records passing here are counted with the real tower.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "inference"))
from tiny_neva import build_assets, train_overrides

from neva_tools.cli.main import main
from neva_tools.errors import NevaError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny assets, and ``bad``: the finetune split with three bad records appended (ids bad-count,
    bad-missing, bad-long) at ``bad_index`` onwards."""
    out = build_assets(tmp_path_factory.mktemp("precheck"), train=4)
    records = json.loads(out["data"]["finetune"].read_text())
    question = [{"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": "red"}]
    bad = [
        {"id": "bad-count", "image": "00000.png",
         "conversations": [{"from": "human", "value": "<image>\n<image>\nTwice?"}, {"from": "gpt", "value": "red"}]},
        {"id": "bad-missing", "image": "no_such_image.png", "conversations": question},
        {"id": "bad-long", "image": "00000.png",
         "conversations": [question[0], {"from": "gpt", "value": " ".join(["red square"] * 200)}]},
    ]  # fmt: skip
    out["bad"] = out["root"] / "bad.json"
    out["bad"].write_text(json.dumps(records + bad))
    out["bad_index"] = len(records)
    return out


def _job(assets: dict[str, Any], name: str, data: Path) -> list[str]:
    return [*train_overrides(assets, name, 2), f"model.data.data_path={data}"]


def _no_model(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make reading the vision weights and building the model fail loudly; returns the calls seen."""
    calls: list[str] = []

    def refuse(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            raise AssertionError(f"{name} was called: the data check must stop the job first")

        return call

    monkeypatch.setattr("neva_tools.model.neva_io.build_neva", refuse("build_neva"))
    monkeypatch.setattr("neva_tools.model.vision.read_clip_vision", refuse("read_clip_vision"))
    return calls


@pytest.fixture(autouse=True)
def _plain_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)


def test_bad_records_stop_train_before_the_model_is_built(assets: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    calls = _no_model(monkeypatch)
    assert main(["train", *_job(assets, "bad", assets["bad"])]) == 2
    err = capsys.readouterr().err
    assert calls == []
    assert err.count("neva: error:") == 1, err
    assert "the training data has 3 record(s) training cannot use, of" in err and "neva data validate --config" in err
    i, bad = assets["bad_index"], assets["bad"]
    assert f"{bad}:index {i} (id bad-count): image_count_mismatch: 2 <image> placeholders but 1 images" in err
    assert f"{bad}:index {i + 1} (id bad-missing): image_missing: image file not found" in err
    assert f"{bad}:index {i + 2} (id bad-long): too_long:" in err
    assert "text tokens + images of 16 tokens" in err  # counted with the 28 px / 7 px tower
    assert not (assets["root"] / "runs" / "bad" / "logs").exists()  # nothing of a training run was written


def test_valid_data_passes_the_check_with_the_towers_token_count(
    assets: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The check passes (the next step, reading the vision weights, is where this test stops the job)."""

    def stop(*args: Any, **kwargs: Any) -> Any:
        raise NevaError("stopped after the data check")

    monkeypatch.setattr("neva_tools.model.vision.read_clip_vision", stop)
    records = len(json.loads(assets["data"]["finetune"].read_text()))
    assert main(["train", *_job(assets, "good", assets["data"]["finetune"])]) == 2
    err = capsys.readouterr().err
    assert "neva: error: stopped after the data check" in err
    assert f"INFO: data check: {records} records fit ({records} images, 0 text-only); tokens p50" in err, err


def test_problems_training_goes_on_with_are_a_warning(assets: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """An empty answer is reported by ``neva data validate`` but trains (as an empty message): a warning, no stop."""

    def stop(*args: Any, **kwargs: Any) -> Any:
        raise NevaError("stopped after the data check")

    monkeypatch.setattr("neva_tools.model.vision.read_clip_vision", stop)
    records = json.loads(assets["data"]["finetune"].read_text())
    records.append({"id": "blank", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": " "}]})
    data = assets["root"] / "blank.json"
    data.write_text(json.dumps(records))
    assert main(["train", *_job(assets, "blank", data)]) == 2
    err = capsys.readouterr().err
    assert "neva: error: stopped after the data check" in err
    assert f"WARNING: the training data has 1 empty_turn (of {len(records)} records); training goes on" in err, err


def test_the_check_counts_image_tokens_as_the_dataset_does(assets: dict[str, Any]) -> None:
    """Every record's length in the check equals the training dataset's (``NevaDataset.length`` + 1: the check
    counts the sequence before the next-token shift), AnyRes included."""
    from neva_tools.config.load import load_config
    from neva_tools.data.anyres import ImageLayout
    from neva_tools.data.dataset import NevaDataset
    from neva_tools.data.images import ImageProcessor
    from neva_tools.train.data_check import check_data
    from neva_tools.train.run import _datasets

    for extra in ([], ["model.data.image_aspect_ratio=anyres", "model.data.image_grid_pinpoints=(1x1),...,(2x2)",
                       "model.mm_cfg.mm_patch_merge_type=spatial_unpad"]):  # fmt: skip
        cfg = load_config(None, [*_job(assets, "count", assets["data"]["finetune"]), *extra])
        report = check_data(cfg, 28, 7, assets["tokenizer"])
        layout = ImageLayout.from_config(cfg.model.data, cfg.model.mm_cfg, 28, 7)
        processor = ImageProcessor(28, str(cfg.model.data.image_aspect_ratio), layout=layout)
        dataset = NevaDataset(_datasets(cfg), assets["tokenizer"], processor, template="vicuna_v1")
        assert report.ok and report.lengths == [dataset.length(i) + 1 for i in range(len(dataset))]


def test_config_validate_reports_the_data_problems(assets: dict[str, Any],
                                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    job = _job(assets, "cv", assets["bad"])
    assert main(["config", "validate", *job]) == 1
    out = capsys.readouterr().out
    assert "(id bad-missing): image_missing" in out and "(id bad-count): image_count_mismatch" in out
    assert "FAILED: the config is valid but 3 record(s) of its data cannot be trained on" in out

    records = len(json.loads(assets["data"]["finetune"].read_text()))
    assert main(["config", "validate", *_job(assets, "cv", assets["data"]["finetune"])]) == 0
    out = capsys.readouterr().out
    assert f"OK: the config is valid; its data's {records} records can be trained on" in out


def test_config_validate_points_to_data_validate_when_it_cannot_check(
    assets: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    job = _job(assets, "cv", assets["bad"])
    assert main(["config", "validate", *job, "--offline"]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert out.startswith("OK: the config is valid; its data was not checked (--offline): run `neva data validate "
                          "--config conf/neva_config.yaml --set=name=cv"), out  # fmt: skip
    # the command it names runs the check of neva train
    assert main(["data", "validate", "--config", "conf/neva_config.yaml", *(f"--set={o}" for o in job),
                 "--no-decode", "--no-progress"]) == 1  # fmt: skip
    assert "(id bad-long): too_long" in capsys.readouterr().out


def test_a_bad_record_stops_a_two_process_run_once(assets: dict[str, Any]) -> None:
    """``scripts/train.sh 2`` at TP 2: rank 0 stops with the report, the launcher stops rank 1, one error."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NEVA_REPORT_DIR")}
    env.update(PYTHONPATH=str(ROOT), NEVA_PYTHON=sys.executable)
    command = [str(ROOT / "scripts" / "train.sh"), "2", *_job(assets, "two", assets["bad"]),
               "model.tensor_model_parallel_size=2"]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert done.stderr.count("neva: error:") == 1, done.stderr[-3000:]
    assert "(id bad-missing): image_missing" in done.stderr and "Traceback" not in done.stderr
