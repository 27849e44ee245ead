"""``neva_tools.evalsets.resume.AnswerLog``: what survives an interruption, and what is refused on reopening."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from neva_tools.errors import NevaError
from neva_tools.evalsets.resume import AnswerLog

META = {"model": "a.nemo", "max_new_tokens": 8}


def test_rows_survive_and_a_cut_line_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    with AnswerLog(path, "index", meta=META) as log:
        log.append([{"index": 0, "prediction": "A"}, {"index": 1, "prediction": "B"}])
        log.append([])
    with open(path, "a") as fh:
        fh.write('{"index": 2, "pred')  # killed mid-write
    with AnswerLog(path, "index", meta=META) as log:
        assert list(log.done) == [0, 1]
        log.append([{"index": 2, "prediction": "C"}])
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [{"_meta": META}, {"index": 0, "prediction": "A"}, {"index": 1, "prediction": "B"},
                     {"index": 2, "prediction": "C"}]  # fmt: skip
    assert list(AnswerLog(path, "index", meta=META, fresh=True).done) == [] and not path.exists()


def test_reopening_refuses_other_runs_and_other_files(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    with AnswerLog(path, "index", meta=META) as log:
        log.append([{"index": 0, "prediction": "A"}])
    with pytest.raises(NevaError, match=r"holds answers of another run \(model: 'a.nemo' then, 'b.nemo' now\)"):
        AnswerLog(path, "index", meta={**META, "model": "b.nemo"})
    (tmp_path / "plain.jsonl").write_text('{"index": 0}\n')
    with pytest.raises(NevaError, match="does not start with the settings line"):
        AnswerLog(tmp_path / "plain.jsonl", "index", meta=META)
    (tmp_path / "bad.jsonl").write_text('{"question_id": 1}\nnot json\n')
    with pytest.raises(NevaError, match=r"bad\.jsonl:line 2 is not JSON"):
        AnswerLog(tmp_path / "bad.jsonl", "question_id")
    with pytest.raises(NevaError, match="line 1: no usable 'index' key"):
        AnswerLog(tmp_path / "bad.jsonl", "index")
    reader = AnswerLog(path, "index", meta=META, write=False)  # another TP rank: reads, never writes
    reader.append([{"index": 5, "prediction": "D"}])
    assert 5 in reader.done and "D" not in path.read_text()
