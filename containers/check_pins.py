#!/usr/bin/env python3
"""Check that every version written in the Dockerfiles is the lock's (requirements/*.txt).

Checked, each problem reported as ``FILE:LINE: what was found and what to do`` (exit 1 if any):
  * every ``FROM`` resolves (through ``ARG`` defaults) to an exact tag or a digest, never a bare name or ``latest``;
    a ``python:X.Y...`` base must be a Python that ``requires-python`` in pyproject.toml allows;
  * every ``io.neva.version.NAME`` label equals the lock's pin of NAME (``python``: allowed by ``requires-python``);
  * every ``name==version`` in a ``RUN`` and every ``ARG NAME_VERSION=...`` default equals the lock's pin of that name,
    and names the lock does not pin may not be pinned in a Dockerfile at all;
  * every ``-r requirements/FILE`` installed is a lock file;
  * the lock itself holds only exact ``name==version`` lines, each name once.
Standard library only.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"(?<![\w.-])([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([A-Za-z0-9][A-Za-z0-9.+!_-]*)")
LABEL = re.compile(r"""io\.neva\.version\.([A-Za-z0-9._-]+)=("[^"]*"|'[^']*'|\S+)""")
REQ_FILE = re.compile(r"(?:^|\s)(?:-r|--requirement)[\s=]+(\S+)")
VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction with continuation lines joined, and the line it starts on."""

    line: int
    keyword: str
    args: str


def normalize(name: str) -> str:
    """PEP 503 name normalization."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _shown(path: Path) -> Path:
    """``path`` relative to the working directory when it is below it (shorter messages)."""
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path


def read_lock(lock_dir: Path) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """``{normalized name: (version, "file:line")}`` from ``lock_dir/*.txt``, and the problems found in them."""
    pins: dict[str, tuple[str, str]] = {}
    problems = []
    files = sorted(lock_dir.glob("*.txt"))
    if not files:
        problems.append(f"{lock_dir}: no lock files (*.txt) found; pass --lock-dir")
    for path in files:
        for number, raw in enumerate(path.read_text().splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            where = f"{_shown(path)}:{number}"
            match = PIN.fullmatch(line)
            if not match:
                problems.append(f"{where}: {line!r} is not an exact pin; write name==version")
                continue
            name, version = normalize(match[1]), match[2]
            if name in pins and pins[name][0] != version:
                problems.append(f"{where}: {name}=={version} but {pins[name][1]} pins {pins[name][0]}; keep one")
            pins.setdefault(name, (version, where))
    return pins, problems


def python_range(pyproject: Path) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(lowest allowed, first excluded)`` minor versions from ``requires-python = ">=A.B,<C.D"``."""
    spec = tomllib.loads(pyproject.read_text())["project"]["requires-python"]
    low = re.search(r">=\s*(\d+)\.(\d+)", spec)
    high = re.search(r"<\s*(\d+)\.(\d+)", spec)
    if not (low and high):
        raise SystemExit(f"{pyproject}: requires-python {spec!r} is not of the form '>=A.B,<C.D'")
    return (int(low[1]), int(low[2])), (int(high[1]), int(high[2]))


def instructions(text: str) -> list[Instruction]:
    """The instructions of a Dockerfile (comments dropped, ``\\`` continuations joined)."""
    result, parts, start = [], [], 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not parts and (not stripped or stripped.startswith("#")):
            continue
        if parts and stripped.startswith("#"):
            continue
        if not parts:
            start = number
        if stripped.endswith("\\"):
            parts.append(stripped[:-1])
            continue
        parts.append(stripped)
        keyword, _, args = " ".join(parts).partition(" ")
        result.append(Instruction(start, keyword.upper(), args.strip()))
        parts = []
    if parts:
        keyword, _, args = " ".join(parts).partition(" ")
        result.append(Instruction(start, keyword.upper(), args.strip()))
    return result


def _arg_defaults(args: str) -> dict[str, str]:
    name, sep, value = args.partition("=")
    return {name.strip(): value.strip().strip("\"'")} if sep else {}


def _check_image(ref: str, where: str, py: tuple[tuple[int, int], tuple[int, int]]) -> list[str]:
    if "$" in ref:
        return [f"{where}: base image {ref!r} uses an ARG without a default; give the ARG an exact tag as default"]
    if "@sha256:" in ref:
        return []
    name, _, tag = ref.rpartition(":") if ":" in ref.rsplit("/", 1)[-1] else (ref, "", "")
    if not tag or tag == "latest" or not re.search(r"\d", tag):
        return [f"{where}: base image {ref!r} has no exact tag; pin a versioned tag (e.g. name:1.2.3) or a digest"]
    problems = []
    version = re.match(r"(\d+)\.(\d+)", tag)
    if name.rsplit("/", 1)[-1] == "python" and version:
        minor, (low, high) = (int(version[1]), int(version[2])), py
        if not low <= minor < high:
            allowed = f"{low[0]}.{low[1]} up to (not incl.) {high[0]}.{high[1]}"
            problems.append(
                f"{where}: base image {ref!r} has Python {minor[0]}.{minor[1]} but requires-python allows {allowed}"
            )
    return problems


def _check_pin(name: str, version: str, where: str, lock: dict[str, tuple[str, str]]) -> list[str]:
    key = normalize(name)
    if key not in lock:
        return [
            f"{where}: {name}=={version} is pinned here but not in the lock; add it to requirements/*.txt "
            "and install it with -r"
        ]
    if lock[key][0] != version:
        return [
            f"{where}: {name} is {version} here but {lock[key][0]} in the lock ({lock[key][1]}); change one to match"
        ]
    return []


def check_dockerfile(
    path: Path, lock: dict[str, tuple[str, str]], lock_dir: Path, py: tuple[tuple[int, int], tuple[int, int]]
) -> tuple[list[str], int]:
    """The problems of one Dockerfile and the number of versions checked in it."""
    problems: list[str] = []
    checked = 0
    global_args: dict[str, str] = {}
    stages: set[str] = set()
    seen_from = False
    for ins in instructions(path.read_text()):
        where = f"{path}:{ins.line}"
        if ins.keyword == "ARG":
            defaults = _arg_defaults(ins.args)
            if not seen_from:
                global_args.update(defaults)
            for arg, value in defaults.items():
                if arg.endswith("_VERSION") and arg != "PYTHON_VERSION" and value:
                    checked += 1
                    name = arg.removesuffix("_VERSION").lower().replace("_", "-")
                    problems += _check_pin(name, value, f"{where}: ARG {arg}", lock)
        elif ins.keyword == "FROM":
            seen_from = True
            words = [w for w in ins.args.split() if not w.startswith("--")]
            ref = VAR.sub(lambda m: global_args.get(m[1], m[0]), words[0]) if words else ""
            if len(words) >= 3 and words[1].upper() == "AS":
                stages.add(words[2])
            if ref not in stages:
                checked += 1
                problems += _check_image(ref, where, py)
        elif ins.keyword == "LABEL":
            for name, value in LABEL.findall(ins.args):
                value = value.strip("\"'")
                checked += 1
                if name == "python":
                    minor = tuple(int(x) for x in value.split(".")[:2])
                    if not py[0] <= minor < py[1]:
                        problems.append(
                            f"{where}: label python={value} but requires-python allows "
                            f"{py[0][0]}.{py[0][1]} up to (not incl.) {py[1][0]}.{py[1][1]}"
                        )
                else:
                    problems += _check_pin(name, value, where, lock)
        elif ins.keyword == "RUN":
            for name, version in PIN.findall(ins.args):
                checked += 1
                problems += _check_pin(name, version, where, lock)
            for req in REQ_FILE.findall(ins.args):
                if Path(req).parent.name != lock_dir.name or not (lock_dir / Path(req).name).is_file():
                    problems.append(
                        f"{where}: installs -r {req}, which is not a lock file in {lock_dir}; "
                        "install from requirements/*.txt"
                    )
    return problems, checked


def main(argv: list[str] | None = None) -> int:
    """Check the Dockerfiles given; print every problem; exit 1 if there is any."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dockerfiles", nargs="+", type=Path)
    parser.add_argument("--lock-dir", type=Path, default=ROOT / "requirements")
    parser.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    args = parser.parse_args(argv)
    lock, problems = read_lock(args.lock_dir)
    py = python_range(args.pyproject)
    total = 0
    for path in args.dockerfiles:
        if not path.is_file():
            problems.append(f"{path}: no such Dockerfile")
            continue
        found, checked = check_dockerfile(path, lock, args.lock_dir, py)
        problems += found
        total += checked
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"check_pins: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(
        f"check_pins: {len(args.dockerfiles)} Dockerfile(s), {total} versions and base images match the lock "
        f"({len(lock)} pins in {args.lock_dir})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
