"""``neva export hf-llava`` and ``neva import hf-llava`` from the command line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from neva_models import safetensors_of, state_of

from neva_tools.cli.main import main


def test_export_then_import(neva_tp2: Path, exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, back = tmp_path / "hf", tmp_path / "back.nemo"
    assert main(["export", "hf-llava", "--input", str(neva_tp2), "--output", str(out), "--no-progress"]) == 0
    assert main(["import", "hf-llava", "--input", str(out), "--output", str(back), "--tp", "2", "-q"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"Wrote {out}", f"Wrote {back}"]
    a, b = safetensors_of(out), safetensors_of(exported)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(v, state_of(back, 1)[k]) for k, v in state_of(neva_tp2, 1).items())


@pytest.mark.parametrize(("args", "message"), [
    (["export", "hf-llava", "--input", "{nemo}", "--output", "{tmp}/o", "--config", "x.yaml"],
     "--config and --set describe a run's checkpoints"),
    (["export", "hf-llava", "--all-checkpoints", "{tmp}/nowhere", "--output", "{tmp}/o"], "nowhere does not exist"),
    (["export", "hf-llava", "--input", "{tmp}/none.nemo", "--output", "{tmp}/o"], "none.nemo does not exist"),
    (["import", "hf-llava", "--input", "{tmp}", "--output", "{tmp}/o.nemo"], "has no config.json"),
])  # fmt: skip
def test_user_errors_are_one_line(args: list[str], message: str, neva_nemo: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    argv = [a.format(nemo=neva_nemo, tmp=tmp_path) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("neva: error:") and message in err and "Traceback" not in err
