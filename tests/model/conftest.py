"""Fixtures shared by the model tests."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from dist_helpers import in_process_distributed


@pytest.fixture(scope="module")
def dist() -> Iterator[None]:
    """A one-process megatron parallel state (TP 1) for the tests of one module."""
    with in_process_distributed(tp=1):
        yield
