#!/usr/bin/env python3
"""The base image's own torch stack (torch, torchvision, Transformer Engine, apex, ...) as pip constraints.

``python base_stack.py > base-stack.txt`` prints ``name==version`` for each of those distributions that is installed;
used as ``PIP_CONSTRAINT`` while the lock is installed on top of an NGC PyTorch image, pip can then never replace
them (it fails instead). ``--check base-stack.txt`` verifies afterwards that nothing changed. Standard library only:
it runs in the image before anything is installed.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

#: Distributions the GPU image keeps from its base (normalized names); torch must be among the installed ones.
BASE_STACK = (
    "torch",
    "torchvision",
    "torchaudio",
    "triton",
    "pytorch-triton",
    "transformer-engine",
    "transformer-engine-torch",
    "transformer-engine-cu12",
    "transformer-engine-cu13",
    "apex",
    "flash-attn",
)


def normalize(name: str) -> str:
    """PEP 503 name normalization (``Transformer_Engine`` → ``transformer-engine``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_stack() -> dict[str, str]:
    """``{name: version}`` of the installed base-stack distributions."""
    found = {}
    for dist in metadata.distributions():
        name = normalize(dist.metadata["Name"] or "")
        if name in BASE_STACK:
            found[name] = dist.version
    return dict(sorted(found.items()))


def read_constraints(path: Path) -> dict[str, str]:
    """``{name: version}`` from a ``name==version`` file written by this script."""
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise SystemExit(f"{path}:{number}: expected name==version, found {line!r}")
        pins[normalize(name)] = version.strip()
    return pins


def main(argv: list[str] | None = None) -> int:
    """Print the constraints, or with ``--check FILE`` compare them with FILE (exit 1 on any change)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", type=Path, metavar="FILE", help="fail if the installed stack differs from FILE")
    args = parser.parse_args(argv)
    now = installed_stack()
    if "torch" not in now:
        print("base_stack: torch is not installed in this image; use an NGC PyTorch base image", file=sys.stderr)
        return 1
    if args.check is None:
        print("\n".join(f"{name}=={version}" for name, version in now.items()))
        return 0
    before = read_constraints(args.check)
    changed = [
        f"{n}: {before.get(n, 'absent')} -> {now.get(n, 'absent')}"
        for n in sorted(set(before) | set(now))
        if before.get(n) != now.get(n)
    ]
    if changed:
        print(
            f"base_stack: the base image's stack changed ({'; '.join(changed)}); "
            f"a pin in requirements/ needs another version of it",
            file=sys.stderr,
        )
        return 1
    print(f"base_stack: unchanged ({', '.join(f'{n} {v}' for n, v in now.items())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
