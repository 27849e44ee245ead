"""Dataset registry and ``name%P`` sampling."""

from __future__ import annotations

from pathlib import Path

import pytest

from neva_tools.data import registry as registry_module
from neva_tools.data.registry import SHIPPED_REGISTRY, find_registry, load_registry, parse_dataset_list, sample_indices
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


def test_entries_resolve_against_the_registry_folder_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "datasets.yaml").write_text(
        "cc3m:\n  annotation_path: cc3m/chat.json\n  data_path: cc3m/images\n"
        "home:\n  annotation_path: ~/home.json\n  data_path: /abs/images\n"
    )
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path / "b")
    reg = load_registry("../a/datasets.yaml")  # relative to the current directory, b/
    monkeypatch.chdir(tmp_path)  # the specs must not depend on where they were loaded from
    cc3m, home = reg["cc3m"], reg["home"]
    assert cc3m.annotation_path.is_absolute() and cc3m.data_path is not None and cc3m.data_path.is_absolute()
    assert cc3m.annotation_path.resolve() == (tmp_path / "a" / "cc3m" / "chat.json").resolve()
    assert cc3m.data_path.resolve() == (tmp_path / "a" / "cc3m" / "images").resolve()
    assert home.annotation_path == tmp_path / "home" / "home.json" and home.data_path == Path("/abs/images")


def test_default_registry_is_found_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert SHIPPED_REGISTRY == REPO / "conf" / "datasets.yaml"
    assert find_registry("conf/datasets.yaml") == SHIPPED_REGISTRY
    assert {"cc3m", "llava_instruct"} <= set(load_registry("./conf/datasets.yaml"))
    local = tmp_path / "conf" / "datasets.yaml"  # one in the current directory comes first
    local.parent.mkdir()
    local.write_text("mine:\n  annotation_path: mine.json\n")
    reg = load_registry("conf/datasets.yaml")
    assert list(reg) == ["mine"] and reg["mine"].annotation_path == Path.cwd() / "conf" / "mine.json"


def test_config_validate_finds_the_default_registry_outside_the_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from neva_tools.cli.main import main

    monkeypatch.chdir(tmp_path)
    assert main(["config", "validate", "model.data.data_path=cc3m%50"]) == 1  # no LLM nor CLIP given
    out = capsys.readouterr().out
    assert "problem: dataset cc3m: annotation file" in out and "registry" not in out


def test_registry_not_found_names_the_places_looked_at(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shipped = tmp_path / "install" / "conf" / "datasets.yaml"
    monkeypatch.setattr(registry_module, "SHIPPED_REGISTRY", shipped)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    cwd = Path.cwd()
    with pytest.raises(NevaError) as exc:
        load_registry("conf/datasets.yaml")
    assert str(exc.value).startswith(
        f"model.data.registry (conf/datasets.yaml): no dataset registry file at {cwd / 'conf' / 'datasets.yaml'} "
        f"(relative to the current directory) and {shipped} (the registry shipped with neva_tools); give"
    )
    with pytest.raises(NevaError) as exc:  # a registry of the user's own: only the current directory
        load_registry("my_datasets.yaml")
    assert f"at {cwd / 'my_datasets.yaml'} (relative to the current directory); give" in str(exc.value)
    with pytest.raises(NevaError, match=r"model.data.registry \(/nowhere/d.yaml\): no dataset registry file at "
                                        r"/nowhere/d.yaml; give"):  # fmt: skip
        load_registry("/nowhere/d.yaml")
    with pytest.raises(NevaError, match=r"model\.data\.registry is not set"):
        load_registry(None)
