"""Dataset registry and ``name%P`` sampling."""

from __future__ import annotations

from pathlib import Path

import pytest

from neva_tools.data.registry import load_registry, parse_dataset_list, sample_indices
from neva_tools.errors import NevaError

REPO = Path(__file__).resolve().parents[2]


def _registry(tmp_path: Path) -> Path:
    path = tmp_path / "datasets.yaml"
    path.write_text(
        "cc3m:\n  annotation_path: cc3m/chat.json\n  data_path: cc3m/images\n  template: plain\n"
        "instruct:\n  annotation_path: /abs/instruct.jsonl\n  data_path:\n"
    )
    return path


def test_registry_resolves_relative_paths_and_parses_lists(tmp_path: Path) -> None:
    reg = load_registry(_registry(tmp_path))
    assert reg["cc3m"].annotation_path == tmp_path / "cc3m/chat.json" and reg["cc3m"].template == "plain"
    assert reg["instruct"].data_path is None and reg["instruct"].annotation_path == Path("/abs/instruct.jsonl")
    uses = parse_dataset_list("cc3m%50, instruct", reg)
    assert [(u.spec.name, u.percent) for u in uses] == [("cc3m", 50.0), ("instruct", 100.0)]


def test_unknown_name_lists_registered_and_suggests(tmp_path: Path) -> None:
    reg = load_registry(_registry(tmp_path))
    with pytest.raises(
        NevaError, match=r"unknown dataset 'cc3n' \(did you mean 'cc3m'\?\); registered datasets: cc3m, instruct"
    ):
        parse_dataset_list("cc3n%20", reg)
    with pytest.raises(NevaError, match="not of the form"):
        parse_dataset_list("cc3m%abc", reg)


def test_unknown_registry_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("x:\n  annotation_path: a.json\n  image_path: imgs\n")
    with pytest.raises(NevaError, match=r"unknown keys \['image_path'\]"):
        load_registry(path)


def test_sampling_counts_and_determinism() -> None:
    a = sample_indices(1000, 50, seed=1, name="cc3m")
    assert len(a) == 500 and len(set(a)) == 500 and a == sorted(a)
    assert a == sample_indices(1000, 50, seed=1, name="cc3m")
    assert a != sample_indices(1000, 50, seed=2, name="cc3m")
    assert a != sample_indices(1000, 50, seed=1, name="other")
    assert len(sample_indices(10, 33, seed=0, name="x")) == 3  # floor(10 * 0.33)
    assert sample_indices(4, 100, seed=0, name="x") == [0, 1, 2, 3]
    over = sample_indices(10, 250, seed=0, name="x")
    assert len(over) == 25 and over[:20] == list(range(10)) * 2


def test_shipped_registry_loads() -> None:
    reg = load_registry(REPO / "conf" / "datasets.yaml")
    assert {"cc3m", "llava_instruct"} <= set(reg)
