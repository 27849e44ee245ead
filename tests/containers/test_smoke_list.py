"""containers/smoke-tests.txt: every entry run inside the image exists, and the demo and each tool are covered."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "containers" / "smoke-tests.txt"


def _entries() -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in SMOKE.read_text().splitlines())
    return [line for line in lines if line]


def test_every_entry_names_an_existing_test() -> None:
    entries = _entries()
    assert entries
    for entry in entries:
        path, _, name = entry.partition("::")
        file = ROOT / path
        assert file.is_file() and file.name.startswith("test_"), entry
        if name:
            tree = ast.parse(file.read_text())
            defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
            assert name.split("[", 1)[0] in defined, f"{entry}: no test function {name} in {path}"


def test_covers_the_demo_and_each_tool() -> None:
    text = " ".join(_entries())
    assert "tests/test_demo.py" in text
    for needle in ("tokenizer", "convert/", "repartition", "data_cli", "config/test_load", "train/", "test_main"):
        assert needle in text, needle
