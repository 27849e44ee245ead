"""Fixtures for the container checks: the repository root and the scripts under containers/ loaded as modules."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

CONTAINERS = Path(__file__).resolve().parents[2] / "containers"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"containers_{name}", CONTAINERS / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def check_pins() -> ModuleType:
    """``containers/check_pins.py``."""
    return _load("check_pins")


@pytest.fixture(scope="session")
def base_stack() -> ModuleType:
    """``containers/base_stack.py``."""
    return _load("base_stack")
