"""An annotation file without a record (empty, ``[]``, blank lines) is an error: ``neva data validate``, ``neva
config validate`` and ``neva train`` say so (exit status 2) instead of reporting an empty dataset as valid."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from neva_tools.cli.main import main
from neva_tools.data.records import iter_records, load_annotations
from neva_tools.errors import NevaError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "inference"))
from tiny_neva import build_assets, train_overrides

EMPTY = {"empty.jsonl": b"", "list.json": b"[]\n", "blank.jsonl": b"\n  \n\n", "bom.json": b"\xef\xbb\xbf[ ]"}


@pytest.fixture(autouse=True)
def _plain_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)


def _message(path: Path) -> str:
    return f"annotation file {path} holds no records (it is empty, an empty JSON list or blank lines)"


@pytest.mark.parametrize("name", sorted(EMPTY))
def test_data_validate_says_the_file_is_empty(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / name
    path.write_bytes(EMPTY[name])
    assert main(["--no-progress", "data", "validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"neva: error: {_message(path)}") and "Traceback" not in err, err
    with pytest.raises(NevaError, match="holds no records"):
        load_annotations(path)


def test_a_file_with_only_broken_entries_is_not_empty(tmp_path: Path) -> None:
    """Unreadable entries are reported as problems of the file, not as an empty file."""
    path = tmp_path / "broken.jsonl"
    path.write_text("{not json}\n")
    assert len(list(iter_records(path))) == 1


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = build_assets(tmp_path_factory.mktemp("empty"), train=4)
    out["empty"] = out["root"] / "empty.json"
    out["empty"].write_text("[]")
    return out


def test_config_validate_and_train_say_the_data_is_empty(assets: dict[str, Any],
                                                         capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    overrides = [*train_overrides(assets, "empty", 2), f"model.data.data_path={assets['empty']}"]
    for command in (["config", "validate"], ["train"]):
        assert main([*command, *overrides]) == 2, command
        out, err = capsys.readouterr()
        assert _message(assets["empty"]) in err and "Traceback" not in err, (command, out, err)
    assert not (assets["root"] / "runs" / "empty" / "checkpoints").exists()
