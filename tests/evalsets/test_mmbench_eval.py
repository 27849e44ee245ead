"""``neva eval --benchmark mmbench`` end to end on a tiny NeVA: the table from the per-question answers, CircularEval
against plain, the prompt as ``neva generate`` renders it, and resuming without re-asking (model calls counted)."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import pytest
from dist_helpers import in_process_distributed
from evalset_files import Counter, shapes_questions, write_tsv

from neva_tools.cli.main import main
from neva_tools.evalsets.mmbench import build_prompt, decode_image, questions_to_ask, read_tsv

ROWS_CIRCULAR = 3 + 4 + 3 + 2 + 2  # rotations of the five questions


def hand_count(predictions: Path) -> tuple[dict[str, float], int]:
    """Overall and per-category accuracy recounted from the per-question TSV: a question is right when every row
    of its group has the extracted letter equal to the answer; and the number of unmatched rows."""
    with open(predictions, encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    groups: dict[int, list[dict]] = defaultdict(list)
    for row in rows:
        groups[int(row["index"]) % 1_000_000].append(row)
    hits = {g: all(r["extracted"] == r["answer"] for r in rs) for g, rs in groups.items() if rs[0]["answer"]}
    by: dict[str, list[bool]] = defaultdict(list)
    for g, hit in hits.items():
        by["Overall"].append(hit)
        by[groups[g][0]["category"]].append(hit)
    return {k: sum(v) / len(v) for k, v in by.items()}, sum(not r["extracted"] for r in rows)


def test_mmbench_table_of_a_model_that_says_a(says_a_neva: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    """Answering "A" to everything: plain MMBench counts the questions whose answer is A, CircularEval none (each
    question's rotations move its answer off A)."""
    tsv = write_tsv(tmp_path / "mmb.tsv", shapes_questions())
    out = tmp_path / "res.json"
    argv = ["eval", "--model", str(says_a_neva), "--benchmark", "mmbench", str(tsv), "--output", str(out),
            "--max-new-tokens", "1", "--batch-size", "4", "--no-progress"]  # fmt: skip
    counter = Counter(monkeypatch)
    assert main(argv) == 0
    assert counter.requests == ROWS_CIRCULAR
    circular = json.loads(out.read_text())
    counted, unmatched = hand_count(tmp_path / "res.predictions.tsv")
    with open(tmp_path / "res.predictions.tsv", encoding="utf-8") as fh:
        assert {(r["prediction"], r["extracted"]) for r in csv.DictReader(fh, delimiter="\t")} == {("A", "A")}
    assert circular["table"]["dev"] == {"Overall": 0.0, "CP": 0.0, "FP-S": 0.0, "attribute_recognition": 0.0,
                                       "image_topic": 0.0, "object_localization": 0.0}  # fmt: skip
    assert counted == {k: v for k, v in circular["table"]["dev"].items() if k in counted} and unmatched == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].split() == ["split", "dev"] and printed[2].split() == ["Overall", "0.0"]
    assert main([*argv, "--no-circular", "--overwrite"]) == 0  # the plain questions are the first rotations
    assert counter.requests == ROWS_CIRCULAR  # nothing asked again
    plain = json.loads(out.read_text())
    assert plain["table"]["dev"] == {
        "Overall": 1 / 4,
        "CP": 0.0,
        "FP-S": 1 / 3,
        "attribute_recognition": 1 / 2,
        "image_topic": 0.0,
        "object_localization": 0.0,
    }  # only question 0's answer is A
    assert hand_count(tmp_path / "res.predictions.tsv")[0]["Overall"] == 1 / 4
    assert (plain["rows_asked"], plain["scored"], plain["predict_only"]) == (5, 4, [4])


def test_mmbench_limit_resume_and_prompt(tiny_neva: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    tsv = write_tsv(tmp_path / "mmb.tsv", shapes_questions())
    out = tmp_path / "res.json"
    argv = ["eval", "--model", str(tiny_neva), "--benchmark", "mmbench", str(tsv), "--output", str(out),
            "--max-new-tokens", "4", "--no-progress"]  # fmt: skip
    counter = Counter(monkeypatch)
    assert main([*argv, "--limit", "2", "--batch-size", "1"]) == 0  # smoke run: the first two questions
    assert counter.requests == 3 + 4
    first = json.loads(out.read_text())
    assert (first["questions"], first["rows_asked"], first["scored"]) == (2, 7, 2)
    capsys.readouterr()
    assert main([*argv, "--batch-size", "3"]) == 2  # the report exists: --overwrite needed
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main([*argv, "--batch-size", "3", "--overwrite"]) == 0
    assert counter.requests == ROWS_CIRCULAR  # only the other three questions' rotations were asked
    report = json.loads(out.read_text())
    assert report["asked_this_run"] == ROWS_CIRCULAR - 7 and report["predict_only"] == [4]
    counted, unmatched = hand_count(tmp_path / "res.predictions.tsv")
    assert report["unmatched"]["count"] == unmatched and report["table"]["dev"]["Overall"] == counted["Overall"]
    log = [json.loads(line) for line in (tmp_path / "res.answers.jsonl").read_text().splitlines()]
    assert "_meta" in log[0] and len(log) == 1 + ROWS_CIRCULAR and len({r["index"] for r in log[1:]}) == ROWS_CIRCULAR

    # the prompt and image are those of `neva generate` (the existing one-question answer path)
    from neva_tools.inference.answer import answer
    from neva_tools.inference.load import load_neva

    asked = questions_to_ask(read_tsv(tsv), circular=True)
    with in_process_distributed():
        loaded = load_neva(tiny_neva)
        for q in asked[:7]:  # answered at batch size 1
            expected = answer(loaded, build_prompt(q), [decode_image(q)], max_new_tokens=4).text
            assert next(r["prediction"] for r in log[1:] if r["index"] == q.index) == expected
    capsys.readouterr()
    assert main([*argv, "--overwrite", "--max-new-tokens", "5"]) == 2  # other settings: not mixed into the log
    assert "holds answers of another run (max_new_tokens: 4 then, 5 now)" in capsys.readouterr().err


def test_interrupted_mmbench_resumes(tiny_neva: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tsv = write_tsv(tmp_path / "mmb.tsv", shapes_questions())
    argv = ["eval", "--model", str(tiny_neva), "--benchmark", "mmbench", str(tsv), "--output",
            str(tmp_path / "r.json"), "--max-new-tokens", "3", "--batch-size", "4", "--no-progress"]  # fmt: skip
    interrupted = Counter(monkeypatch, interrupt_at=3)
    assert main(argv) == 130  # Ctrl-C during the third batch
    assert interrupted.requests == 8 and not (tmp_path / "r.json").exists()
    answers = tmp_path / "r.answers.jsonl"
    assert len(answers.read_text().splitlines()) == 1 + 8  # the two finished batches were kept
    with open(answers, "a") as fh:
        fh.write('{"index": 3, "predic')  # a line cut short by a kill
    resumed = Counter(monkeypatch)
    assert main(argv) == 0
    assert resumed.requests == ROWS_CIRCULAR - 8
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["asked_this_run"] == ROWS_CIRCULAR - 8 and report["rows_asked"] == ROWS_CIRCULAR
    restarted = Counter(monkeypatch)
    assert main([*argv, "--overwrite", "--no-resume", "--limit", "1"]) == 0
    assert restarted.requests == 3
