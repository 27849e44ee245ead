"""The small things a user meets: the launch hint of TP in one process, the empty-answer notice of ``neva
generate``, and ``neva -q train`` printing the ``.nemo`` it wrote (also when the run had already finished)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from neva_tools.cli.main import main
from neva_tools.inference.generate import Generation


@pytest.fixture(autouse=True)
def _plain_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)


def test_tp2_in_one_process_says_how_to_launch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", f"exp_manager.exp_dir={tmp_path}", "model.tensor_model_parallel_size=2"]) == 2
    err = capsys.readouterr().err
    assert err.count("neva: error:") == 1
    assert ("world size (1) must be divisible by TP×PP (2): a plain `neva train` is one process; launch a multiple "
            "of 2 processes, one per GPU, e.g. `scripts/train.sh 2 CONFIG [key=value ...]` (torchrun on one node)"
            ) in err, err  # fmt: skip


def _fake_generation(monkeypatch: pytest.MonkeyPatch, out: Generation) -> None:
    """``neva generate`` without a model: the session, the loading and the answer are stand-ins."""
    monkeypatch.setattr("neva_tools.inference.session.inference_session", lambda *a, **k: contextlib.nullcontext())
    monkeypatch.setattr("neva_tools.inference.load.load_neva", lambda *a, **k: SimpleNamespace())
    monkeypatch.setattr("neva_tools.inference.answer.answer", lambda *a, **k: out)


def test_an_empty_answer_prints_nothing_and_says_why(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    _fake_generation(monkeypatch, Generation(tokens=[], text="", stop="stop_token", prompt_length=9))
    assert main(["generate", "--model", "m.nemo", "--prompt", "What is shown?"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "WARNING: the model produced an empty answer (EOS first);" in captured.err
    assert main(["generate", "--model", "m.nemo", "--prompt", "What is shown?", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"answer": "", "stop": "stop_token", "new_tokens": 0}
    assert main(["-q", "generate", "--model", "m.nemo", "--prompt", "What is shown?"]) == 0
    assert capsys.readouterr() == ("", "")


def test_a_real_answer_is_printed_without_a_notice(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    _fake_generation(monkeypatch, Generation(tokens=[5], text="red", stop="stop_token", prompt_length=9))
    assert main(["generate", "--model", "m.nemo", "--prompt", "What colour?"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "red\n" and "empty answer" not in captured.err


def test_quiet_train_prints_the_nemo_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    nemo = tmp_path / "run" / "run.nemo"
    monkeypatch.setattr("neva_tools.train.run.train", lambda cfg: nemo)
    assert main(["-q", "train", "name=run"]) == 0
    assert capsys.readouterr() == (f"{nemo}\n", "")
    assert main(["train", "name=run"]) == 0  # without -q the end-of-run summary names it (on stderr)
    assert capsys.readouterr().out == ""


def test_quiet_train_of_a_finished_run_prints_its_nemo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """The "nothing to do: the run already reached max_steps" warning is hidden by -q; the path is still printed."""
    from neva_tools.train.fit import _finished

    nemo = tmp_path / "done.nemo"
    nemo.write_bytes(b"")

    def finished(cfg: Any) -> Path | None:
        return _finished(4, 4, tmp_path / "checkpoints" / "step=4", nemo, True)

    monkeypatch.setattr("neva_tools.train.run.train", finished)
    assert main(["-q", "train", "name=done"]) == 0
    assert capsys.readouterr() == (f"{nemo}\n", "")
    assert main(["train", "name=done"]) == 0
    err = capsys.readouterr().err
    assert "WARNING: nothing to do: the run already reached max_steps (4)" in err and f"Final model: {nemo}" in err
