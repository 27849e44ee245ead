"""Fixtures of the inference tests: one tiny NeVA trained by ``neva train`` (stage 2, 8 steps) per session."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_helpers import run_distributed
from tiny_neva import build_assets, train_job, train_overrides


@pytest.fixture(scope="session")
def neva_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Assets (data, tokenizer, LLM .nemo, CLIP) and ``nemo``: the trained NeVA .nemo."""
    assets = build_assets(tmp_path_factory.mktemp("inference"))
    out = run_distributed(train_job, 1, train_overrides(assets, "tiny", 8), timeout=600)[0]
    assert out is not None
    return {**assets, "nemo": Path(out)}
