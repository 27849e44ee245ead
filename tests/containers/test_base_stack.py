"""containers/base_stack.py: the GPU image's guard that installing the lock never replaces the base's torch stack."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parents[2] / "containers" / "base_stack.py"
TORCH = version("torch")  # the distribution's version (torch.__version__ may carry a +cuXXX suffix)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_prints_the_installed_stack_as_constraints() -> None:
    proc = _run()
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert f"torch=={TORCH}" in lines and f"torchvision=={version('torchvision')}" in lines
    assert all(line.count("==") == 1 for line in lines)


def test_check_passes_when_unchanged_and_names_what_changed(tmp_path: Path) -> None:
    pins = tmp_path / "base-stack.txt"
    pins.write_text(_run().stdout)
    same = _run("--check", str(pins))
    assert same.returncode == 0 and f"torch {TORCH}" in same.stdout
    pins.write_text(pins.read_text().replace(f"torch=={TORCH}", "torch==2.10.0a0+nv26.01"))
    changed = _run("--check", str(pins))
    assert changed.returncode == 1
    assert f"torch: 2.10.0a0+nv26.01 -> {TORCH}" in changed.stderr


def test_names_are_normalized(base_stack: ModuleType, tmp_path: Path) -> None:
    assert base_stack.normalize("Transformer_Engine.Torch") == "transformer-engine-torch"
    pins = tmp_path / "c.txt"
    pins.write_text("# kept\nTorch==2.1.0  # inline\n\n")
    assert base_stack.read_constraints(pins) == {"torch": "2.1.0"}
