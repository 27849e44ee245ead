"""Fuzzed ``config.json`` and ``model_config.yaml`` (hypothesis, bounded examples): a converter either converts
(exit 0, a readable output) or gives our one-line error (exit 2, nothing written) — never a traceback (a bug
propagates out of ``main`` here and fails the test)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from builders import build_tiny_llm, nemo_with_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neva_tools.checkpoint.nemo_archive import NemoArchive
from neva_tools.cli.main import main
from neva_tools.convert.hf_to_nemo import convert_hf_to_nemo

DROP = "<drop>"
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63), st.sampled_from([0, 1, -1, 2, 3, 7, 64, 10**12]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.sampled_from(["llama", "silu", "1e-5"]),
)  # fmt: skip
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny sharded LLaMA (with its index) and its ``.nemo``."""
    root = tmp_path_factory.mktemp("fuzz_cfg")
    hf = build_tiny_llm("llama", root / "hf", shard="60KB")
    nemo = root / "tp1.nemo"
    convert_hf_to_nemo(str(hf), nemo)
    return hf, nemo


def _mutate(data: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(data)
    for key, value in changes.items():
        if value == DROP:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def _text_mutation(text: str, at: float, junk: str, cut: bool) -> str:
    i = int(at * len(text))
    return text[:i] + junk + ("" if cut else text[i:])


def _changes(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from([*keys, "extra_key"]), VALUES | st.just(DROP), min_size=1, max_size=3)


def _run(argv: list[str], out: Path, capsys: pytest.CaptureFixture[str]) -> int:
    capsys.readouterr()
    status = main(["-q", "--no-progress", *argv])
    err = capsys.readouterr().err
    assert status in (0, 2), (status, err)
    assert "Traceback" not in err, err
    if status == 2:
        assert err.startswith("neva: error: "), err
        assert os.listdir(out) == [], os.listdir(out)
    return status


def _hf_copy(hf: Path, dest: Path, config_text: str | bytes) -> Path:
    dest.mkdir()
    for item in hf.iterdir():
        (dest / item.name).write_bytes(item.read_bytes())
    raw = config_text if isinstance(config_text, bytes) else config_text.encode(errors="surrogateescape")
    (dest / "config.json").write_bytes(raw)
    return dest


def _converts(hf: Path, root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = root / "out"
    out.mkdir()
    if _run(["convert", "hf-to-nemo", "--input", str(hf), "--output", str(out / "m.nemo")], out, capsys) == 0:
        with NemoArchive(out / "m.nemo") as archive:  # what was written is a .nemo our readers take
            assert archive.read_config()["num_layers"] >= 1


@FUZZ
@given(data=st.data())
def test_fuzzed_config_json(source: tuple[Path, Path], capsys: pytest.CaptureFixture[str], data: st.DataObject) -> None:
    hf, _ = source
    config = json.loads((hf / "config.json").read_text())
    if data.draw(st.booleans(), label="value mutation"):
        changes = data.draw(_changes(sorted(config)), label="changes")
        text = json.dumps(_mutate(config, changes), allow_nan=True)
    else:
        text = _text_mutation(json.dumps(config), data.draw(st.floats(0, 1)), data.draw(st.text(max_size=4)),
                              data.draw(st.booleans()))  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _converts(_hf_copy(hf, root / "hf", text), root, capsys)


@FUZZ
@given(data=st.data())
def test_fuzzed_model_config_yaml(source: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
                                  data: st.DataObject) -> None:  # fmt: skip
    _, nemo = source
    with NemoArchive(nemo) as archive:
        config = archive.read_config()
    if data.draw(st.booleans(), label="value mutation"):
        changes = data.draw(_changes(sorted(config)), label="changes")
        text = yaml.safe_dump(_mutate(config, changes))
    else:
        text = _text_mutation(yaml.safe_dump(config), data.draw(st.floats(0, 1)), data.draw(st.text(max_size=4)),
                              data.draw(st.booleans()))  # fmt: skip
    command = data.draw(st.sampled_from(["repartition", "nemo-to-hf"]), label="command")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bad = nemo_with_config(nemo, root / "bad.nemo", text)
        out = root / "out"
        out.mkdir()
        argv = (["repartition", "--input", str(bad), "--output", str(out / "re.nemo"), "--tp", "2"]
                if command == "repartition" else
                ["convert", "nemo-to-hf", "--input", str(bad), "--output", str(out / "hf")])  # fmt: skip
        _run(argv, out, capsys)
