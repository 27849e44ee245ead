"""containers/check_pins.py: the Dockerfiles' versions are the lock's, and every kind of drift is reported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "containers" / "check_pins.py"
DOCKERFILES = sorted((ROOT / "containers").glob("Dockerfile*"))
BROKEN = Path(__file__).parent / "fixtures" / "Dockerfile.broken"


def _run(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=cwd)


def _lock_lines(name: str) -> list[str]:
    lines = (ROOT / "requirements" / name).read_text().splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")]


def test_repository_dockerfiles_match_the_lock() -> None:
    assert {p.name for p in DOCKERFILES} >= {"Dockerfile.cpu", "Dockerfile.gpu"}
    proc = _run(*DOCKERFILES)
    assert proc.returncode == 0, proc.stderr
    assert f"{len(DOCKERFILES)} Dockerfile(s)" in proc.stdout and "match the lock" in proc.stdout


def test_broken_dockerfile_fails_with_every_problem_located() -> None:
    proc = _run(BROKEN)
    assert proc.returncode == 1
    name = "tests/containers/fixtures/Dockerfile.broken"
    expected = [
        f"{name}:2: base image 'python:latest' has no exact tag",
        f"{name}:3: ARG MEGATRON_CORE_VERSION: megatron-core is 0.15.0 here but 0.16.1 in the lock",
        f"{name}:4: transformers is 4.40.0 here but 5.23.0 in the lock (requirements/runtime.txt:",
        f"{name}:6: torch is 2.13.0 here but 2.14.1 in the lock (requirements/torch.txt:",
        f"{name}:6: megatron-core is 0.15.0 here but 0.16.1 in the lock",
        f"{name}:6: einops==0.8.0 is pinned here but not in the lock; add it to requirements/*.txt",
        f"{name}:7: installs -r requirements.txt, which is not a lock file",
    ]
    for line in expected:
        assert line in proc.stderr, (line, proc.stderr)
    assert "check_pins: 7 problem(s)" in proc.stderr


@pytest.mark.parametrize(
    ("dockerfile", "message"),
    [
        ("FROM python\n", "base image 'python' has no exact tag"),
        ("ARG BASE\nFROM ${BASE}\n", "uses an ARG without a default"),
        ("ARG BASE=nvcr.io/nvidia/pytorch:latest\nFROM ${BASE}\n", "'nvcr.io/nvidia/pytorch:latest' has no exact tag"),
        ("FROM docker.io/library/python:3.12.1-slim\n", "has Python 3.12 but requires-python allows 3.11"),
        ('FROM debian:12.5\nLABEL io.neva.version.python="3.10"\n', "label python=3.10 but requires-python"),
        ('FROM debian:12.5\nLABEL a=b \\\n  io.neva.version.numpy="1.26.4"\n', ":2: numpy is 1.26.4 here"),
        (
            "FROM debian:12.5\nRUN pip install --no-cache-dir \\\n    'transformers[torch]==4.0.0'\n",
            ":2: transformers is 4.0.0",
        ),
        ("FROM debian:12.5\nRUN pip install -r requirements/other.txt\n", "-r requirements/other.txt, which is not"),
    ],
)
def test_each_rule_reports(dockerfile: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "Dockerfile"
    path.write_text(dockerfile)
    proc = _run(path)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    "dockerfile",
    [
        "FROM debian@sha256:" + "0" * 64 + "\n",
        "ARG BASE=docker.io/library/python:3.11.14-slim-bookworm\nFROM ${BASE} AS build\nFROM build\n",
        'FROM debian:12.5\nLABEL io.neva.version.megatron-core="0.16.1" io.neva.version.python="3.11"\n',
        "FROM debian:12.5\n# pip install numpy==1.0 (a comment)\nRUN pip install -r requirements/runtime.txt\n",
    ],
)
def test_accepted_forms(dockerfile: str, tmp_path: Path) -> None:
    path = tmp_path / "Dockerfile"
    path.write_text(dockerfile)
    proc = _run(path)
    assert proc.returncode == 0, proc.stderr


def test_lock_must_be_exact_and_unique(check_pins: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("# comment\nnumpy>=2\ntorch==2.14.1\n")
    (tmp_path / "b.txt").write_text("Torch==2.13.0\n")
    pins, problems = check_pins.read_lock(tmp_path)
    assert pins["torch"][0] == "2.14.1"
    assert any("a.txt:2: 'numpy>=2' is not an exact pin" in p for p in problems)
    assert any("b.txt:1: torch==2.13.0 but" in p and "pins 2.14.1; keep one" in p for p in problems)
    assert len(problems) == 2


def test_instructions_join_continuations_and_skip_comments(check_pins: ModuleType) -> None:
    text = "# c\nFROM a:1\nRUN one \\\n  # inside\n  two\n\nLABEL x=1\n"
    got = [(i.line, i.keyword, i.args) for i in check_pins.instructions(text)]
    assert got == [(2, "FROM", "a:1"), (3, "RUN", "one  two"), (7, "LABEL", "x=1")]


def test_pyproject_reads_its_dependencies_from_the_lock() -> None:
    from setuptools.config.pyprojecttoml import read_configuration

    project = read_configuration(ROOT / "pyproject.toml")["project"]
    assert project["dependencies"] == _lock_lines("torch.txt") + _lock_lines("runtime.txt")
    assert project["optional_dependencies"]["dev"] == _lock_lines("test.txt") + _lock_lines("lint.txt")
    assert "megatron-core==0.16.1" in project["dependencies"]
