"""LLaVA's question files in, LLaVA's answer JSONL out; POPE and ScienceQA scored against hand-computed figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from evalset_files import Counter

from neva_tools.cli.main import main
from neva_tools.data.synthetic import Scene, draw
from neva_tools.errors import NevaError
from neva_tools.evalsets.llava_questions import ANSWER_KEYS, SHORTUUID_ALPHABET, read_questions, short_uuid
from neva_tools.evalsets.llava_scoring import pope_metrics, score_pope, score_scienceqa, sqa_letter


def jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_read_questions_both_layouts(tmp_path: Path) -> None:
    lines = [{"question_id": 7, "image": "a.png", "text": "Is there a cat?", "category": "adversarial"},
             {"question_id": "q8", "image": "b.png", "text": "Describe."}]  # fmt: skip
    qs = read_questions(jsonl(tmp_path / "q.jsonl", lines))
    assert [(q.question_id, q.text, q.prompt, q.image, q.category) for q in qs] == [
        (7, "Is there a cat?", "Is there a cat?", "a.png", "adversarial"), ("q8", "Describe.", "Describe.", "b.png",
                                                                            None)]  # fmt: skip
    records = [{"id": "1", "image": "1/image.png", "conversations": [{"from": "human", "value": "<image>\nWhich?\n"
                "Options: (A) x (B) y"}, {"from": "gpt", "value": "A"}]},
               {"id": "2", "conversations": [{"from": "human", "value": "Context: none\nWhich?"}]}]  # fmt: skip
    (tmp_path / "sqa.json").write_text(json.dumps(records))
    sqa = read_questions(tmp_path / "sqa.json", single_pred_prompt=True)
    ask = "Answer with the option's letter from the given choices directly."
    assert sqa[0].text == f"Which?\nOptions: (A) x (B) y\n{ask}" and sqa[0].prompt == "<image>\n" + sqa[0].text
    assert sqa[1].prompt == sqa[1].text == f"Context: none\nWhich?\n{ask}" and sqa[1].image is None


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"question_id": 1, "image": "a.png"}'], r"q.jsonl:line 1: key\(s\) text missing"),
        (['{"question_id": [1], "text": "x"}'], "line 1: the question id must be an integer or a string, found"),
        (['{"question_id": 1, "text": "x"}', '{"question_id": 1, "text": "y"}'], "line 2: question_id 1 repeats"),
        (["{not json"], "q.jsonl:line 1 is not JSON"),
        ([], "holds no questions"),
    ],
)
def test_bad_question_files(tmp_path: Path, lines: list[str], message: str) -> None:
    (tmp_path / "q.jsonl").write_text("\n".join(lines))
    with pytest.raises(NevaError, match=message):
        read_questions(tmp_path / "q.jsonl")


def test_short_uuid_is_shortuuid_shaped() -> None:
    ids = {short_uuid() for _ in range(200)}
    assert len(ids) == 200 and all(len(i) == 22 and set(i) <= set(SHORTUUID_ALPHABET) for i in ids)


def test_pope_by_hand(tmp_path: Path) -> None:
    assert pope_metrics(["Yes, there is a cat.", "No, there is none.", "I do not see it. Yes", "Yes"],
                        ["yes", "no", "yes", "no"]) == {  # yes, no, no ("not" in the first sentence), yes
        "samples": 4, "TP": 1, "FP": 1, "TN": 1, "FN": 1, "accuracy": 0.5, "precision": 0.5, "recall": 0.5,
        "f1": 0.5, "yes_ratio": 0.5}  # fmt: skip
    folder = tmp_path / "pope"
    folder.mkdir()
    jsonl(folder / "coco_pope_adversarial.json", [{"label": x} for x in ("yes", "no", "yes", "no")])
    jsonl(folder / "coco_pope_random.json", [{"label": x} for x in ("yes", "yes", "no")])
    questions = read_questions(jsonl(tmp_path / "q.jsonl", [
        {"question_id": i, "image": "x.png", "text": "?", "category": c}
        for i, c in enumerate(["random", "adversarial", "random", "adversarial", "adversarial", "random",
                               "adversarial"])]))  # fmt: skip
    texts = ["Yes", "Yes, there is a cat.", "yes.", "No, there is none.", "I do not see it. Yes", "Not sure, no.",
             "Yes"]  # random: yes, yes, no (the word "no") → all right  # fmt: skip
    scores = score_pope(questions, [{"question_id": i, "text": t} for i, t in enumerate(texts)], folder)
    assert scores["adversarial"]["accuracy"] == 0.5 and scores["adversarial"]["f1"] == 0.5
    assert scores["random"] == {"samples": 3, "TP": 2, "FP": 0, "TN": 1, "FN": 0, "accuracy": 1.0,
                                "precision": 1.0, "recall": 1.0, "f1": 1.0, "yes_ratio": 2 / 3}  # fmt: skip
    assert scores["mean_accuracy"] == 0.75 and scores["mean_f1"] == 0.75
    assert pope_metrics(["no", "no"], ["yes", "no"])["precision"] is None  # no "yes" answer: undefined, not a crash


@pytest.mark.parametrize(
    ("text", "letter"),
    [("A", "A"), (" B ", "B"), ("C. because", "C"), ("It is so.\nThe answer is D.", "D"), ("The answer is E", "E"),
     ("AB", "FAILED"), ("answer: A", "FAILED"), ("The answer is maybe", "FAILED")],
)  # fmt: skip
def test_sqa_letter(text: str, letter: str) -> None:
    assert sqa_letter(text) == letter


def test_scienceqa_by_hand(tmp_path: Path) -> None:
    problems = {"1": {"choices": ["a", "b", "c"], "answer": 0}, "2": {"choices": ["a", "b"], "answer": 1},
                "3": {"choices": ["a", "b", "c", "d"], "answer": 3}, "4": {"choices": ["a", "b"], "answer": 0},
                "5": {"choices": ["a", "b"], "answer": 0}}  # fmt: skip
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["1", "2", "3", "4"], "val": ["5"]}))
    answers = [{"question_id": "1", "prompt": "<image>\nQ", "text": "A"},  # right, with an image
               {"question_id": "2", "prompt": "Q", "text": "The answer is B."},  # right
               {"question_id": "3", "prompt": "<image>\nQ", "text": "C. c"},  # wrong, with an image
               {"question_id": "5", "prompt": "Q", "text": "A"}]  # another split; problem 4 is unanswered  # fmt: skip
    assert score_scienceqa(answers, tmp_path) == {"split": "test", "count": 4, "correct": 2, "accuracy": 0.5,
                                                  "img_count": 2, "img_correct": 1, "img_accuracy": 0.5,
                                                  "answered": 3}  # fmt: skip
    with pytest.raises(NevaError, match="has no split 'minival'"):
        score_scienceqa(answers, tmp_path, "minival")


def test_pope_and_scienceqa_cli(tiny_neva: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    images = tmp_path / "images"
    images.mkdir()
    for name, scene in {"a.png": Scene("red", "circle", "left"), "b.png": Scene("blue", "square", "top")}.items():
        draw(scene, 28).save(images / name)
    questions = jsonl(tmp_path / "pope.jsonl", [
        {"question_id": 1, "image": "a.png", "text": "Is there a circle in the image?", "category": "random"},
        {"question_id": "2", "image": "b.png", "text": "Is there a dog in the image?", "category": "random"},
        {"question_id": 3, "image": "b.png", "text": "Is there a square?", "category": "popular"}])  # fmt: skip
    pope = tmp_path / "pope_ann"
    pope.mkdir()
    jsonl(pope / "coco_pope_random.json", [{"label": "yes"}, {"label": "no"}])
    jsonl(pope / "coco_pope_popular.json", [{"label": "yes"}])
    answers = tmp_path / "answers.jsonl"
    argv = ["eval", "--model", str(tiny_neva), "--benchmark", "pope", str(questions), "--image-folder", str(images),
            "--answers-file", str(answers), "--annotations", str(pope), "--max-new-tokens", "3",
            "--no-progress"]  # fmt: skip
    counter = Counter(monkeypatch)
    assert main([*argv, "--limit", "2"]) == 0
    assert counter.requests == 2
    assert main([*argv, "--overwrite"]) == 0
    assert counter.requests == 3  # the third question only
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [tuple(r) for r in rows] == [ANSWER_KEYS] * 3  # LLaVA's keys in LLaVA's order
    assert [r["question_id"] for r in rows] == [1, "2", 3] and rows[0]["prompt"] == "Is there a circle in the image?"
    assert all(isinstance(r["text"], str) and len(r["answer_id"]) == 22 and r["model_id"] == "neva"
               and r["metadata"] == {} for r in rows)  # fmt: skip
    scores = json.loads((tmp_path / "answers.scores.json").read_text())
    expected = score_pope(read_questions(questions), rows, pope)
    assert scores == {"benchmark": "pope", **expected} and scores["random"]["samples"] == 2
    assert main([*argv, "--overwrite"]) == 0 and counter.requests == 3  # all answered: scored without the model
    assert main([*argv, "--overwrite", "--model-id", "other"]) == 2  # another model's answers are not mixed in
    assert "holds answers of model neva, not other" in capsys.readouterr().err

    sqa_dir = tmp_path / "sqa"
    sqa_dir.mkdir()
    (sqa_dir / "problems.json").write_text(json.dumps({"10": {"choices": ["red", "blue"], "answer": 0},
                                                       "11": {"choices": ["yes", "no"], "answer": 1}}))  # fmt: skip
    (sqa_dir / "pid_splits.json").write_text(json.dumps({"test": ["10", "11"]}))
    (tmp_path / "sqa.json").write_text(json.dumps([
        {"id": "10", "image": "a.png", "conversations": [{"from": "human",
                                                          "value": "<image>\nColour?\nA. red\nB. blue"}]},
        {"id": "11", "conversations": [{"from": "human", "value": "Is it night?\nA. yes\nB. no"}]}]))  # fmt: skip
    sqa_answers = tmp_path / "sqa_answers.jsonl"
    assert main(["eval", "--model", str(tiny_neva), "--benchmark", "scienceqa", str(tmp_path / "sqa.json"),
                 "--image-folder", str(images), "--answers-file", str(sqa_answers), "--annotations", str(sqa_dir),
                 "--max-new-tokens", "2", "--no-progress"]) == 0  # fmt: skip
    sqa_rows = [json.loads(line) for line in sqa_answers.read_text().splitlines()]
    assert sqa_rows[0]["prompt"].startswith("<image>\nColour?") and "<image>" not in sqa_rows[1]["prompt"]
    report = json.loads((tmp_path / "sqa_answers.scores.json").read_text())
    assert report == {"benchmark": "scienceqa", **score_scienceqa(sqa_rows, sqa_dir)} and report["img_count"] == 1
    assert main(["eval", "--model", str(tiny_neva), "--benchmark", "llava-questions", str(questions)]) == 2
    assert "needs --answers-file" in capsys.readouterr().err
