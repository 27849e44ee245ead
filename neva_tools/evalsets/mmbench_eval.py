"""``neva eval --benchmark mmbench``: ask an MMBench-layout TSV, score it as VLMEvalKit does, write the table.

Outputs, next to ``output`` (the report, ``NAME.json``): ``NAME.predictions.tsv`` (one line per asked row: the
question, options, answer, the model's answer, the extracted letter and, on each question's first row, its hit) and
``NAME.answers.jsonl``, the answers as they are produced (:mod:`neva_tools.evalsets.resume`): a rerun continues it,
also after ``--limit N`` or ``--no-circular`` (the plain questions are the circular run's first rotations).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neva_tools.evalsets import mmbench, table
from neva_tools.evalsets.resume import AnswerLog
from neva_tools.evalsets.runner import Item, answer_items, barrier
from neva_tools.inference.generate import Generation
from neva_tools.inference.load import LoadedNeva
from neva_tools.utils.atomic import OutputKind, atomic_path, check_output_path, json_object
from neva_tools.utils.log import global_rank

logger = logging.getLogger(__name__)


def _per_question_file(path: Path) -> str | None:
    with open(path, encoding="utf-8") as fh:
        header = fh.readline(1 << 16)
    return None if header.startswith("\t".join(table.PER_QUESTION[:3])) else "not a per-question TSV"


REPORT = OutputKind("an MMBench report (neva eval --benchmark mmbench)", False, json_object("benchmark", "table"))
PREDICTIONS = OutputKind("MMBench per-question results", False, _per_question_file)


@dataclass(frozen=True)
class MMBenchSettings:
    """How to ask: CircularEval or not, the first ``limit`` questions only, batch size, answer budget, resume."""

    circular: bool = True
    limit: int | None = None
    batch_size: int = 16
    max_new_tokens: int = 64
    resume: bool = True


def output_paths(output: str | Path) -> dict[str, Path]:
    """``report`` (``output``), ``predictions`` (TSV) and ``answers`` (the resumable log) paths."""
    output = Path(output)
    stem = output.with_suffix("") if output.suffix == ".json" else output
    return {"report": output, "predictions": Path(f"{stem}.predictions.tsv"), "answers": Path(f"{stem}.answers.jsonl")}


def check_outputs(output: str | Path, overwrite: bool) -> None:
    """Refuse existing reports unless ``overwrite`` (before any model is loaded)."""
    paths = output_paths(output)
    check_output_path(paths["report"], overwrite, REPORT)
    check_output_path(paths["predictions"], overwrite, PREDICTIONS)


def first_questions(asked: list[mmbench.Question], limit: int | None) -> list[mmbench.Question]:
    """The rows of the first ``limit`` questions (all their rotations)."""
    if limit is None:
        return asked
    keep = set(list(dict.fromkeys(q.group for q in asked))[:limit])
    return [q for q in asked if q.group in keep]


def evaluate_mmbench(loaded: LoadedNeva, tsv: str | Path, output: str | Path, settings: MMBenchSettings, *,
                     overwrite: bool = False) -> dict[str, Any]:  # fmt: skip
    """Ask, score and (rank 0) write the report, per-question TSV and answer log; returns the report."""
    rows = mmbench.read_tsv(tsv)
    asked = first_questions(mmbench.questions_to_ask(rows, settings.circular), settings.limit)
    paths = output_paths(output)
    meta = {"benchmark": "mmbench", "data": str(Path(tsv).resolve()), "model": str(Path(loaded.source).resolve()),
            "template": loaded.template, "max_new_tokens": settings.max_new_tokens}  # fmt: skip
    by_index = {q.index: q for q in asked}
    items = [Item(q.index, mmbench.build_prompt(q), lambda q=q: [mmbench.decode_image(q, tsv)],
                  f"{tsv}:line {q.row}") for q in asked]  # fmt: skip

    def row(item: Item, out: Generation) -> dict[str, Any]:
        return {"index": item.key, "prediction": out.text, "stop": out.stop, "new_tokens": len(out.tokens),
                "prompt": mmbench.build_prompt(by_index[item.key])}  # fmt: skip

    with AnswerLog(paths["answers"], "index", meta=meta, fresh=not settings.resume, write=global_rank() == 0) as log:
        barrier()
        new = answer_items(loaded, items, log, row, batch_size=settings.batch_size,
                           max_new_tokens=settings.max_new_tokens, desc="MMBench")  # fmt: skip
        predictions = {q.index: str(log.done[q.index]["prediction"]) for q in asked}
    scored = table.score(asked, predictions)
    if scored.unmatched:
        logger.warning("%d answer(s) gave no option letter (counted wrong), e.g. index %s", len(scored.unmatched),
                       ", ".join(map(str, scored.unmatched[:10])))  # fmt: skip
    report = {"benchmark": "mmbench", "model": str(loaded.source), "data": str(tsv), "circular": settings.circular,
              "questions": len({q.group for q in asked}), "rows_asked": len(asked), "asked_this_run": new,
              "scored": len(scored.hits), "correct": sum(scored.hits.values()), "predict_only": scored.predict_only,
              "unmatched": {"count": len(scored.unmatched), "indices": scored.unmatched},
              "table": scored.table, "files": {k: str(v) for k, v in paths.items()}}  # fmt: skip
    if global_rank() == 0:
        with atomic_path(paths["predictions"], kind=PREDICTIONS, overwrite=overwrite) as tmp:
            tmp.write_text(table.per_question_tsv(scored.rows), encoding="utf-8")
        with atomic_path(paths["report"], kind=REPORT, overwrite=overwrite) as tmp:
            tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return report
