"""Scoring MMBench answers into VLMEvalKit's table (``report_acc``): Overall, the l1 abilities, every l2 category.

Each asked row gets the letter :func:`neva_tools.evalsets.extract.infer_letter` reads from its answer; a group (a
question and its rotations) is correct when every row's letter is its answer (one row without CircularEval). Groups
with a row lacking an answer are predicted only. The table has one column per ``split`` and the rows ``split``,
``Overall``, the ``l2-category`` values (the six abilities, abbreviated as VLMEvalKit does: AR, CP, FP-C, FP-S, LR,
RR) and the ``category`` values, each sorted by name; a cell is the mean hit of the groups in it (blank when none).
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from neva_tools.evalsets.extract import infer_letter
from neva_tools.evalsets.mmbench import Question

#: VLMEvalKit's ``MMB_abbrs``: l2-category (MMBench's six l1 abilities) → column name.
ABBREVIATIONS = {
    "coarse_perception": "CP",
    "finegrained_perception (instance-level)": "FP-S",
    "finegrained_perception (cross-instance)": "FP-C",
    "logic_reasoning": "LR",
    "relation_reasoning": "RR",
    "attribute_reasoning": "AR",
}
#: Columns of the per-question file (VLMEvalKit's prediction sheet without the image, plus the scoring).
PER_QUESTION = ("index", "question", "hint", "A", "B", "C", "D", "E", "answer", "category", "l2-category", "split",
                "prediction", "extracted", "hit", "log")  # fmt: skip


@dataclass
class Scored:
    """The scoring of one run: per-row letters, per-group hits, the table."""

    rows: list[dict[str, Any]]  # PER_QUESTION keys, one per asked row, in order
    hits: dict[int, int]  # group index -> 1/0 (scored groups only)
    table: dict[str, dict[str, float | None]]  # split -> row name -> accuracy
    unmatched: list[int]  # indices whose answer gave no letter
    predict_only: list[int]  # groups without an answer on every row


def score(asked: Sequence[Question], predictions: Mapping[int, str]) -> Scored:
    """Score ``asked`` (every row must have a prediction) by VLMEvalKit's exact-matching rules."""
    letters = {q.index: infer_letter(predictions[q.index], q.options) for q in asked}
    groups: dict[int, list[Question]] = defaultdict(list)
    for q in asked:
        groups[q.group].append(q)
    hits, logs, predict_only = {}, {}, []
    for group, members in groups.items():
        if any(q.answer is None for q in members):
            predict_only.append(group)
            continue
        wrong = [q for q in members if letters[q.index] != q.answer]
        hits[group] = int(not wrong)
        logs[group] = "all rotations matched" if not wrong else _failure(wrong[0], letters[wrong[0].index])
    rows = [_row(q, predictions[q.index], letters[q.index], hits, logs) for q in asked]
    mains = [q for q in asked if q.is_main and q.group in hits]
    return Scored(rows, hits, report(mains, hits), [i for i, v in letters.items() if v is None], predict_only)


def _failure(q: Question, letter: str | None) -> str:
    found = "no letter (unmatched)" if letter is None else letter
    return f"index {q.index}: answer {q.answer}, extracted {found}"


def _row(q: Question, prediction: str, letter: str | None, hits: dict[int, int], logs: dict[int, str]) -> dict:
    row = {"index": q.index, "question": q.question, "hint": q.hint or "", **{c: q.options.get(c, "") for c in "ABCDE"},
           "answer": q.answer or "", "category": q.category or "", "l2-category": q.l2_category or "", "split": q.split,
           "prediction": prediction, "extracted": letter or "", "hit": "", "log": ""}  # fmt: skip
    if q.is_main and q.group in hits:
        row["hit"], row["log"] = hits[q.group], logs[q.group]
    return row


def report(mains: Sequence[Question], hits: Mapping[int, int]) -> dict[str, dict[str, float | None]]:
    """VLMEvalKit's ``report_acc``: split → {Overall, abilities, categories} → mean hit (None: no question)."""

    def mean(questions: list[Question]) -> float | None:
        return sum(hits[q.group] for q in questions) / len(questions) if questions else None

    table: dict[str, dict[str, float | None]] = {}
    for split in sorted({q.split for q in mains}):
        in_split = [q for q in mains if q.split == split]
        cells = {"Overall": mean(in_split)}
        for key in ("l2_category", "category"):
            for name in sorted({getattr(q, key) for q in mains} - {None}):  # a column the file lacks: no rows
                cells[ABBREVIATIONS.get(name, name)] = mean([q for q in in_split if getattr(q, key) == name])
        table[split] = cells
    return table


def format_table(table: Mapping[str, Mapping[str, float | None]]) -> str:
    """The table as VLMEvalKit prints it (tabulate's ``simple`` layout without headers): a ``split`` row, then one
    row per name, a column per split, values in full precision."""
    splits = list(table)
    names = list(dict.fromkeys(name for cells in table.values() for name in cells))
    lines = [["split", *splits]]
    for name in names:
        lines.append([name, *("" if table[s].get(name) is None else repr(table[s][name]) for s in splits)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    rule = "  ".join("-" * w for w in widths)
    body = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines]
    return "\n".join([rule, *body, rule])


def per_question_tsv(rows: Sequence[Mapping[str, Any]]) -> str:
    """The per-question rows as a TSV (:data:`PER_QUESTION` columns; a cell with a tab or newline quoted)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, PER_QUESTION, delimiter="\t", lineterminator="\n", extrasaction="raise")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return out.getvalue()
