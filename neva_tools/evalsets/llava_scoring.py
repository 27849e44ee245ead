"""POPE and ScienceQA-IMG scored from their published annotations, as LLaVA's ``eval_pope.py`` and
``eval_science_qa.py`` score an answer file.

POPE: the annotation directory holds ``coco_pope_<category>.json`` files (one ``{"label": "yes"|"no", ...}`` per
line); the answers of a category (the question file's ``category``) are paired in order with its labels. An answer
is "no" when its first sentence (up to the first ``.``, commas removed) has the word ``No``, ``no`` or ``not``, else
"yes". Per category: TP/FP/TN/FN, accuracy, precision, recall, F1 and the yes ratio (a ratio whose denominator is 0
is None, where LLaVA's script divides by zero).

ScienceQA: ``problems.json`` and ``pid_splits.json`` of the annotation directory; every problem of the split is
scored (an unanswered one as FAILED). The letter is the whole answer when it is one of A–E, the first character of
an answer starting ``X. ``, or the letter after ``The answer is``; correct when it is the problem's answer among its
choices. IMG accuracy counts the problems whose recorded prompt holds ``<image>``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from neva_tools.errors import NevaError
from neva_tools.evalsets.llava_questions import LlavaQuestion

logger = logging.getLogger(__name__)
SQA_OPTIONS = ("A", "B", "C", "D", "E")
_THE_ANSWER_IS = re.compile(r"The answer is ([A-E])")


def pope_says_no(text: str) -> bool:
    """LLaVA's POPE reading of an answer: "no" when its first sentence has the word No, no or not."""
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", "").split(" ")
    return "No" in words or "not" in words or "no" in words


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def pope_metrics(answers: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """``eval_pope``'s figures for answers paired in order with ``labels`` (``zip``: the shorter decides)."""
    preds = [0 if pope_says_no(a) else 1 for a in answers]
    truth = [0 if label == "no" else 1 for label in labels]
    pairs = list(zip(preds, truth, strict=False))
    tp = sum(p == 1 and t == 1 for p, t in pairs)
    fp = sum(p == 1 and t == 0 for p, t in pairs)
    tn = sum(p == 0 and t == 0 for p, t in pairs)
    fn = sum(p == 0 and t == 1 for p, t in pairs)
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = None if not precision or not recall else 2 * precision * recall / (precision + recall)
    return {"samples": len(answers), "TP": tp, "FP": fp, "TN": tn, "FN": fn, "accuracy": _ratio(tp + tn, len(pairs)),
            "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": _ratio(preds.count(1), len(preds))}  # fmt: skip


def score_pope(questions: Sequence[LlavaQuestion], answers: Sequence[Mapping[str, Any]],
               annotations: str | Path) -> dict[str, Any]:  # fmt: skip
    """POPE per category of the annotation directory, and the mean accuracy and F1 over the categories."""
    folder = Path(annotations)
    files = sorted(folder.glob("coco_pope_*.json")) if folder.is_dir() else []
    if not files:
        raise NevaError(f"--annotations {folder} holds no coco_pope_<category>.json files (POPE's annotations)")
    category = {q.question_id: q.category for q in questions}
    unknown = [a["question_id"] for a in answers if a["question_id"] not in category]
    if unknown:
        raise NevaError(f"{len(unknown)} answer(s) have a question_id not in the question file, e.g. {unknown[0]!r}")
    out: dict[str, Any] = {}
    for path in files:
        name = path.name[len("coco_pope_") : -len(".json")]
        labels = [_label(line, f"{path}:line {i}") for i, line in enumerate(path.read_text().splitlines(), 1) if line]
        texts = [str(a["text"]) for a in answers if category[a["question_id"]] == name]
        if len(texts) != len(labels):
            logger.warning("POPE %s: %d answer(s) for %d label(s); pairing the first %d in order", name, len(texts),
                           len(labels), min(len(texts), len(labels)))  # fmt: skip
        out[name] = pope_metrics(texts, labels)
    scored = [m for m in out.values() if m["samples"]]
    for key in ("accuracy", "f1"):
        values = [m[key] for m in scored if m[key] is not None]
        out[f"mean_{key}"] = sum(values) / len(values) if values else None
    return out


def _label(line: str, where: str) -> str:
    try:
        label = json.loads(line)["label"]
    except (ValueError, KeyError, TypeError):
        raise NevaError(f"{where}: a POPE annotation line is a JSON object with a 'label'") from None
    return str(label)


def sqa_letter(text: str) -> str:
    """The letter LLaVA's ``eval_science_qa.py`` reads from an answer, or ``FAILED``."""
    text = text.replace("\n", ". ")
    if text.strip() in SQA_OPTIONS:
        return text.strip()
    if len(text) >= 3 and text[0] in SQA_OPTIONS and text[1:3] == ". ":
        return text[0]
    match = _THE_ANSWER_IS.search(text) if "The answer is " in text else None
    return match.group(1) if match else "FAILED"


def score_scienceqa(answers: Sequence[Mapping[str, Any]], annotations: str | Path, split: str = "test") -> dict:
    """Accuracy over the split's problems and over those asked with an image (IMG), as ``eval_science_qa.py``."""
    folder = Path(annotations)
    problems = _json(folder / "problems.json")
    splits = _json(folder / "pid_splits.json")
    if split not in splits:
        raise NevaError(f"{folder / 'pid_splits.json'} has no split {split!r} (found {', '.join(map(str, splits))})")
    by_id = {str(a["question_id"]): a for a in answers}
    correct = total = img_correct = img_total = 0
    for pid in splits[split]:
        if pid not in problems:
            raise NevaError(f"{folder / 'pid_splits.json'}: problem {pid!r} of split {split} is not in problems.json")
        answer = by_id.get(str(pid), {"text": "FAILED", "prompt": "Unknown"})
        letter = sqa_letter(str(answer["text"]))
        choices = SQA_OPTIONS[: len(problems[pid]["choices"])]
        hit = letter in choices and choices.index(letter) == problems[pid]["answer"]
        image = "<image>" in str(answer.get("prompt", ""))
        total, correct = total + 1, correct + hit
        img_total, img_correct = img_total + image, img_correct + (hit and image)
    return {"split": split, "count": total, "correct": correct, "accuracy": _ratio(correct, total),
            "img_count": img_total, "img_correct": img_correct, "img_accuracy": _ratio(img_correct, img_total),
            "answered": sum(str(pid) in by_id for pid in splits[split])}  # fmt: skip


def _json(path: Path) -> Any:
    if not path.is_file():
        raise NevaError(f"{path} does not exist (ScienceQA's annotations: problems.json and pid_splits.json)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise NevaError(f"{path} is not valid JSON ({exc})") from None
