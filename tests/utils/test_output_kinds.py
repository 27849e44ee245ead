"""Output kinds: ``--overwrite`` replaces an earlier output of the same kind, never anything else."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from neva_tools.errors import NevaError
from neva_tools.utils import atomic, output_kinds
from neva_tools.utils.atomic import OutputKind, atomic_path, check_output_path, kind_problem


def _nemo(path: Path) -> None:
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("./model_config.yaml")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"a: 1"))


def _hf_model(path: Path) -> None:
    path.mkdir()
    (path / "config.json").write_text("{}")
    (path / "model-00001-of-00002.safetensors").write_bytes(b"x")


def _hf_tokenizer(path: Path) -> None:
    path.mkdir()
    (path / "tokenizer_config.json").write_text("{}")


def _exports(path: Path) -> None:
    (path / "step=2").mkdir(parents=True)
    (path / ".step=4.tmp-abc").mkdir()


def _mmap_pair(path: Path) -> None:
    path.with_suffix(".idx").write_bytes(b"MMIDIDX\x00\x00" + b"\x01" * 20)
    path.with_suffix(".bin").write_bytes(b"\x01\x02")


def _json(data: object) -> Callable[[Path], None]:
    return lambda path: path.write_text(json.dumps(data) + "\n")


def _sentencepiece(path: Path) -> None:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.pieces.add(piece="<unk>", score=0.0)
    path.write_bytes(proto.SerializeToString())


#: (kind, name of the output, writer of an earlier output of that kind)
EARLIER = [
    (atomic.NEMO_FILE, "m.nemo", _nemo),
    (atomic.HF_MODEL_DIR, "hf", _hf_model),
    (atomic.HF_TOKENIZER_DIR, "tok", _hf_tokenizer),
    (atomic.CHECKPOINT_EXPORTS_DIR, "exports", _exports),
    (atomic.SENTENCEPIECE_MODEL, "t.model", _sentencepiece),
    (atomic.MMAP_BIN, "c_text_document.bin", _mmap_pair),
    (atomic.MMAP_IDX, "c_text_document.idx", _mmap_pair),
    (atomic.PACK_PLAN, "plan.json", _json({"max_seq_length": 8, "fill_ratio": 1.0, "bins": [[0]], "truncated": []})),
    (atomic.EVAL_REPORT, "r.eval.json", _json({"model": "m.nemo", "data": "d.jsonl", "template": "t", "records": 1})),
    (atomic.EVAL_PREDICTIONS, "p.jsonl", _json({"id": "a", "kind": None, "reference": "red", "choice": "red"})),
    (atomic.ANSWERS, "a.jsonl", _json({"id": "a", "prompt": "p", "answer": "x", "stop": "eos", "new_tokens": 1})),
    (atomic.ANY_FILE, "any.txt", lambda path: path.write_text("anything")),
]
IDS = [kind.name for kind, _, _ in EARLIER]


def _victim_dir(path: Path) -> None:
    (path / "sub").mkdir(parents=True)
    (path / "sub" / "data.txt").write_text("important\n")


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("kind", "name", "write"), EARLIER, ids=IDS)
def test_earlier_output_is_replaced_and_others_refused(kind: OutputKind, name: str, write: Callable[[Path], None],
                                                       tmp_path: Path) -> None:  # fmt: skip
    target = tmp_path / name
    write(target)
    assert kind_problem(target, kind) is None
    with pytest.raises(NevaError, match=f"output {target} already exists; pass --overwrite"):
        check_output_path(target, False, kind)
    check_output_path(target, True, kind)
    for other in (tmp_path / "victim", tmp_path / "victim.txt"):
        _victim_dir(other) if other.suffix == "" else other.write_text("important\n")
        before = _snapshot(tmp_path)
        if kind is atomic.ANY_FILE and other.is_file():
            continue  # any file is an earlier "file"
        with pytest.raises(NevaError, match=rf"output {other} is .*choose another path, or remove it yourself"):
            check_output_path(other, True, kind)
        assert _snapshot(tmp_path) == before


def test_messages_say_what_is_there(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    _victim_dir(victim)
    assert kind_problem(victim, atomic.HF_MODEL_DIR) == ("a directory with 1 file that is not a Hugging Face model "
                                                         "directory (no config.json)")  # fmt: skip
    assert kind_problem(victim, atomic.NEMO_FILE) == "a directory with 1 file, not a .nemo file"
    (tmp_path / "f").write_text("important\n")
    assert kind_problem(tmp_path / "f", atomic.NEMO_FILE) == ("a file of 10 bytes that is not a .nemo file (not a tar "
                                                              "archive)")  # fmt: skip
    assert kind_problem(tmp_path / "f", atomic.HF_MODEL_DIR) == "a file of 10 bytes, not a Hugging Face model directory"
    assert "not only step=N directories" in kind_problem(victim, atomic.CHECKPOINT_EXPORTS_DIR)
    (tmp_path / "plan.json").write_text('{"bins": []}')
    assert "without max_seq_length, fill_ratio" in kind_problem(tmp_path / "plan.json", atomic.PACK_PLAN)
    (tmp_path / "x.bin").write_bytes(b"\x00")
    assert "no megatron index x.idx" in kind_problem(tmp_path / "x.bin", atomic.MMAP_BIN)


def test_empty_paths_of_the_right_type_are_replaceable(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.nemo").touch()
    assert kind_problem(tmp_path / "empty", atomic.HF_MODEL_DIR) is None
    assert kind_problem(tmp_path / "empty.nemo", atomic.NEMO_FILE) is None
    assert kind_problem(tmp_path / "empty", atomic.NEMO_FILE) == "an empty directory, not a .nemo file"
    empty_file = kind_problem(tmp_path / "empty.nemo", atomic.HF_MODEL_DIR)
    assert empty_file == "an empty file, not a Hugging Face model directory"


def test_symlinks_are_refused(tmp_path: Path) -> None:
    _hf_model(tmp_path / "hf")
    os.symlink(tmp_path / "hf", tmp_path / "link")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    assert kind_problem(tmp_path / "link", atomic.HF_MODEL_DIR) == f"a symbolic link to {tmp_path / 'hf'}"
    with pytest.raises(NevaError, match="dangling is a symbolic link"):
        check_output_path(tmp_path / "dangling", True, atomic.ANY_FILE)


def test_large_json_is_recognised_by_its_first_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(output_kinds, "_JSON_PARSE_LIMIT", 64)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"max_seq_length": 8, "fill_ratio": 1.0, "bins": [[i] for i in range(100)]}))
    assert kind_problem(plan, atomic.PACK_PLAN) is None
    plan.write_text(json.dumps({"other": list(range(100))}))
    assert kind_problem(plan, atomic.PACK_PLAN) is not None


def test_something_appearing_meanwhile_is_not_replaced(tmp_path: Path) -> None:
    target = tmp_path / "m.nemo"
    refused = pytest.raises(NevaError, match=r"is a directory with 1 file, not a \.nemo file")
    with refused, atomic_path(target, kind=atomic.NEMO_FILE) as tmp:
        _nemo(tmp)
        _victim_dir(target)
    assert _snapshot(tmp_path) == {"m.nemo/sub/data.txt": b"important\n"}
    assert sorted(os.listdir(tmp_path)) == ["m.nemo"]


def test_directory_kind_replaces_a_directory_of_its_kind(tmp_path: Path) -> None:
    target = tmp_path / "hf"
    _hf_model(target)
    with atomic_path(target, kind=atomic.HF_MODEL_DIR) as tmp:
        (tmp / "config.json").write_text('{"new": 1}')
        (tmp / "model.safetensors").write_bytes(b"y")
    assert _snapshot(target) == {"config.json": b'{"new": 1}', "model.safetensors": b"y"}
    assert sorted(os.listdir(tmp_path)) == ["hf"]
