"""The demo pipeline at reduced size: every stage runs (two CPU processes at TP=2) and reports accuracy."""

from __future__ import annotations

import json
from pathlib import Path

from neva_tools.demo import run


def test_demo_pipeline_reduced(tmp_path: Path) -> None:
    result = run(tmp_path, train=24, heldout=6, stage1_steps=4, stage2_steps=8)
    assert set(result["eval"]) == {"colour", "shape", "position"}
    assert all(r["questions"] == 6 and 0.0 <= r["accuracy"] <= 1.0 for r in result["eval"].values())
    assert Path(result["final_nemo"]).is_file() and Path(result["loss_png"]).is_file()
    assert json.loads((tmp_path / "eval.json").read_text())["final_nemo"] == result["final_nemo"]
    losses = [float(r.split(",")[1]) for r in (Path(result["logs"]) / "loss.csv").read_text().splitlines()[1:]]
    assert len(losses) == 8 and losses[-1] < losses[0]
