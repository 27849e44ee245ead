"""Broken config files given to the converters: our error (exit 2) naming the file, the key or value and what to do,
never a traceback, and no output written."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from builders import build_tiny_llm, nemo_with_config

from neva_tools.checkpoint.nemo_archive import NemoArchive
from neva_tools.cli.main import main
from neva_tools.convert.hf_to_nemo import convert_hf_to_nemo

DROP = object()


@pytest.fixture(scope="module")
def hf_sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaMA saved in several safetensors shards with an index."""
    return build_tiny_llm("llama", tmp_path_factory.mktemp("bad_cfg") / "hf", shard="60KB")


@pytest.fixture
def hf(hf_sharded: Path, tmp_path: Path) -> Path:
    """A fresh copy of the sharded model for a test to break."""
    copy = tmp_path / "hf"
    copy.mkdir()
    for item in hf_sharded.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    return copy


@pytest.fixture(scope="module")
def nemo(hf_sharded: Path) -> Path:
    out = hf_sharded.parent / "tp1.nemo"
    convert_hf_to_nemo(str(hf_sharded), out)
    return out


def exits_2(argv: list[str], capsys: pytest.CaptureFixture[str], *wanted: str) -> str:
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.startswith("neva: error: ") and "Traceback" not in err, err
    for text in wanted:
        assert text in err, err
    return err


def hf_to_nemo(hf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], *wanted: str) -> None:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    exits_2(["convert", "hf-to-nemo", "--input", str(hf), "--output", str(out / "o.nemo")], capsys, *wanted)
    assert os.listdir(out) == []


def edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is DROP:
            del data[key]
        else:
            data[key] = value
    path.write_text(json.dumps(data))


# -- config.json -----------------------------------------------------------------------------------------------------


def test_config_json_without_num_attention_heads(hf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit_json(hf / "config.json", num_attention_heads=DROP)
    hf_to_nemo(hf, tmp_path, capsys, f"{hf / 'config.json'}: required key 'num_attention_heads' is missing",
               "use the config file written with these weights")  # fmt: skip


def test_config_json_that_is_a_list(hf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (hf / "config.json").write_text(json.dumps([{"num_attention_heads": 4}]))
    hf_to_nemo(hf, tmp_path, capsys, f"{hf / 'config.json'} holds a JSON list, not an object")


def test_config_json_not_utf8(hf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = hf / "config.json"
    path.write_bytes(path.read_bytes().replace(b'"llama"', b'"ll\xe9ama"'))
    hf_to_nemo(hf, tmp_path, capsys, f"{path} is not UTF-8 text (byte ", "save it as UTF-8")


def test_config_json_with_a_bom_is_read(hf: Path, tmp_path: Path) -> None:
    path = hf / "config.json"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert main(["convert", "hf-to-nemo", "--input", str(hf), "--output", str(tmp_path / "o.nemo")]) == 0


def test_config_json_nested_too_deep(hf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (hf / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    hf_to_nemo(hf, tmp_path, capsys, f"{hf / 'config.json'} is not valid JSON")


@pytest.mark.parametrize(
    ("changes", "wanted"),
    [
        ({"num_attention_heads": "four"}, "num_attention_heads is 'four'; it must be an integer of at least 1"),
        ({"num_attention_heads": 0}, "num_attention_heads is 0; it must be an integer of at least 1"),
        ({"hidden_size": 64.5}, "hidden_size is 64.5; it must be an integer"),
        ({"num_hidden_layers": True}, "num_hidden_layers is True; it must be an integer"),
        ({"intermediate_size": None}, "required key 'intermediate_size' is missing"),
        ({"num_key_value_heads": 3}, "attention heads (4) must be a multiple of the number of key/value heads (3)"),
        ({"rms_norm_eps": "tiny"}, "rms_norm_eps is 'tiny'; it must be a number"),
        ({"rope_parameters": {"rope_theta": [1]}}, "rope_theta is [1]; it must be a number"),
        ({"rope_scaling": ["linear", 2]}, "rope_scaling is ['linear', 2]; it must be a mapping"),
        ({"rope_scaling": {"rope_type": "linear"}}, "rope_scaling.factor is None; it must be a number"),
        ({"architectures": {"Llama": 1}, "model_type": 7}, "architecture {'Llama': 1} is not supported; supported"),
    ],
)
def test_config_json_ill_typed_values(
    hf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], changes: dict, wanted: str
) -> None:
    edit_json(hf / "config.json", **changes)
    hf_to_nemo(hf, tmp_path, capsys, f"{hf / 'config.json'}", wanted)


# -- model.safetensors.index.json ------------------------------------------------------------------------------------


def test_index_without_weight_map(hf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    index = hf / "model.safetensors.index.json"
    edit_json(index, weight_map=DROP)
    hf_to_nemo(hf, tmp_path, capsys, f"{index} has no weight_map of tensor names to weight file names",
               "re-download the model")  # fmt: skip


@pytest.mark.parametrize(
    ("content", "wanted"),
    [
        (b'["model-00001-of-00002.safetensors"]', "holds a JSON list, not an object with a weight_map"),
        (b'{"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}}', "has no weight_map of tensor names"),
        (b'{"weight_map": {"model.norm.weight": 3}}', "has no weight_map of tensor names"),
        (b'{"weight_map": {"model.norm.weight": "\xff.safetensors"}}', "is not UTF-8 text"),
        (b'{"weight_map": ', "is not valid JSON"),
    ],
)
def test_index_broken(
    hf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, wanted: str
) -> None:
    index = hf / "model.safetensors.index.json"
    index.write_bytes(content)
    hf_to_nemo(hf, tmp_path, capsys, f"{index}", wanted)


# -- model_config.yaml of a .nemo ------------------------------------------------------------------------------------


def nemo_refused(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], *wanted: str) -> None:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    for argv in (
        ["repartition", "--input", str(source), "--output", str(out / "re.nemo"), "--tp", "2"],
        ["convert", "nemo-to-hf", "--input", str(source), "--output", str(out / "hf")],
    ):
        exits_2(argv, capsys, *wanted)
        assert os.listdir(out) == [], argv


def _config(nemo: Path, **changes: Any) -> str:
    with NemoArchive(nemo) as archive:
        cfg = archive.read_config()
    for key, value in changes.items():
        if value is DROP:
            del cfg[key]
        else:
            cfg[key] = value
    return yaml.safe_dump(cfg)


def test_nemo_config_without_num_attention_heads(nemo: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    bad = nemo_with_config(nemo, tmp_path / "bad.nemo", _config(nemo, num_attention_heads=DROP))
    nemo_refused(bad, tmp_path, capsys, f"{bad}:model_config.yaml: required key 'num_attention_heads' is missing")


@pytest.mark.parametrize(
    ("changes", "wanted"),
    [
        ({"num_attention_heads": "abc"}, "num_attention_heads is 'abc'; it must be an integer of at least 1"),
        ({"num_layers": -1}, "num_layers is -1; it must be an integer of at least 1"),
        ({"num_query_groups": 3}, "attention heads (4) must be a multiple of the number of key/value heads (3)"),
        ({"vocab_size": "big"}, "vocab_size is 'big'; it must be an integer"),
        ({"layernorm_epsilon": "x"}, "layernorm_epsilon is 'x'; it must be a number"),
        ({"rope_scaling": [1, 2]}, "rope_scaling is [1, 2]; it must be a mapping"),
        ({"max_position_embeddings": None, "encoder_seq_length": None}, "required key 'encoder_seq_length'"),
        ({"make_vocab_size_divisible_by": "x"}, "make_vocab_size_divisible_by 'x'; it must be a positive integer"),
    ],
)
def test_nemo_config_ill_typed_values(
    nemo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], changes: dict, wanted: str
) -> None:
    bad = nemo_with_config(nemo, tmp_path / "bad.nemo", _config(nemo, **changes))
    nemo_refused(bad, tmp_path, capsys, f"{bad}", wanted)


def test_nemo_config_that_is_a_list(nemo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = nemo_with_config(nemo, tmp_path / "bad.nemo", "- num_layers: 2\n")
    nemo_refused(bad, tmp_path, capsys, f"{bad}: model_config.yaml is not a mapping")


@pytest.mark.parametrize(
    ("text", "wanted"),
    [
        ("[" * 100_000 + "]" * 100_000, "model_config.yaml is nested too deeply"),
        ("num_layers: 2\nname: \udcff\n", "model_config.yaml is not valid YAML"),
        ("num_layers: [2\n", "model_config.yaml is not valid YAML"),
    ],
)
def test_nemo_config_unreadable(
    nemo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, wanted: str
) -> None:
    bad = nemo_with_config(nemo, tmp_path / "bad.nemo", text)
    nemo_refused(bad, tmp_path, capsys, f"{bad}: {wanted}")
