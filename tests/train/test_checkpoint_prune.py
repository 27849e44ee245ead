"""``exp_manager.save_top_k``: ``checkpoint.prune`` keeps the newest k complete ``step=N`` checkpoints, never the
protected ones (just written, resumed from), and leaves incomplete saves and other directories alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from neva_tools.train.checkpoint import prune


def _checkpoints(root: Path, *names: str, complete: bool = True) -> None:
    for name in names:
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / "metadata.json").write_text("{}")


def _left(root: Path) -> list[str]:
    return sorted((p.name for p in root.iterdir()), key=lambda n: (len(n), n))


@pytest.mark.parametrize(("keep", "left"), [(-1, ["step=2", "step=4", "step=10", "step=12"]),
                                            (1, ["step=12"]), (2, ["step=10", "step=12"]),
                                            (9, ["step=2", "step=4", "step=10", "step=12"])])  # fmt: skip
def test_keeps_the_newest_k(tmp_path: Path, keep: int, left: list[str]) -> None:
    _checkpoints(tmp_path, "step=2", "step=10", "step=4", "step=12")  # numeric order, not the names' order
    prune(tmp_path, keep, protect=[tmp_path / "step=12"])
    assert [n for n in _left(tmp_path) if n.startswith("step=")] == left


def test_protected_incomplete_and_other_directories_stay(tmp_path: Path) -> None:
    _checkpoints(tmp_path, "step=2", "step=4", "step=6", "manual_copy")
    _checkpoints(tmp_path, "step=8", complete=False)  # a save that did not finish
    deleted = prune(tmp_path, 1, protect=[tmp_path / "step=6", tmp_path / "step=2"])
    assert [p.name for p in deleted] == ["step=4"]
    assert _left(tmp_path) == ["step=2", "step=6", "step=8", "manual_copy"]


def test_missing_root(tmp_path: Path) -> None:
    assert prune(tmp_path / "none", 1) == []
