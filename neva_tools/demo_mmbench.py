"""The demo's held-out questions as an MMBench-layout TSV, asked as ``neva eval --benchmark mmbench`` asks them.

Each held-out record (one colour, shape or position question per image) becomes one MMBench row: the question
without the demo's "Answer with one word." (MMBench's prompt brings its own instruction), up to four options drawn
from the demo's candidate answers (shape has three), the right one at a letter that cycles per kind, a hint on every
fourth row, ``category`` = the question kind and ``l2-category`` = MMBench's ``finegrained_perception
(instance-level)`` (FP-S, the ability that holds attribute recognition and object localization), split ``dev``. As
in VLMEvalKit's files, an image's later questions name the index of the row that holds its base64 PNG.

The options' texts are the demo's answer words. The tiny model is trained on "Answer with one word." questions,
and VLMEvalKit's prompt (option lines, then "Answer with the option's letter …") is outside what it has seen: asked
as is, it answers fragments. :func:`mc_records` adds multiple-choice records of the *training* images to the stage-2
data (``--mc-share`` of it, :data:`MC_SHARE` by default), as LLaVA-1.5's instruction mix does with A-OKVQA: the
same question, options drawn the same way, rendered by the evaluation's own
:func:`~neva_tools.evalsets.mmbench.build_prompt`. Their answer is the right option's *text*, not its letter:
VLMEvalKit's extraction accepts an answer naming exactly one option's text (its second rule,
:func:`~neva_tools.evalsets.extract.infer_text`), and a model of this size does not learn to point from the
option's text to its letter (letter answers, measured: every answer a letter, accuracy at chance).
:func:`corpus` gives their text to the tokenizer.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import random
import shutil
from pathlib import Path
from typing import Any

from neva_tools.data import synthetic
from neva_tools.errors import NevaError
from neva_tools.evalsets.mmbench import ASK_EN, Question, build_prompt
from neva_tools.utils.atomic import atomic_path

HEADER = ("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "split", "image")
LETTERS = "ABCD"
ABILITY = "finegrained_perception (instance-level)"  #: MMBench's l1 ability (l2-category column) of all three kinds
HINT = "The image shows one shape on a plain grey background."
HINT_EVERY = 4  #: rows 0, 4, 8, … carry the hint
SPLIT = "dev"
MAX_NEW_TOKENS = 8  #: the demo's answers are one word (a token or two) and the stop token
BATCH_SIZE = 32
#: Share of the stage-2 records that are multiple-choice (LLaVA-1.5's A-OKVQA role).
MC_SHARE = 0.2
MC_MAX_SEQ_LENGTH = 448  #: stage 2's max_seq_length with them (their prompts reach ~370 tokens with the image)


def draw_options(rng: random.Random, choices: list[str], answer: str, at: int | None = None) -> tuple[list[str], int]:
    """Up to four options: ``answer`` and others drawn from ``choices``, the answer at position ``at`` (modulo the
    number of options; ``None``: a random one). Returns the options and the answer's position."""
    pool = [c for c in choices if c != answer]
    n = min(len(LETTERS), len(pool) + 1)
    options = rng.sample(pool, n - 1)
    at = rng.randrange(n) if at is None else at % n
    options.insert(at, answer)
    return options, at


def mc_records(records: list[dict[str, Any]], candidates: dict[str, list[str]], share: float = MC_SHARE,
               seed: int = 1) -> list[dict[str, Any]]:  # fmt: skip
    """Multiple-choice records for the one-word question records ``records`` (``kind``, ``image``, answer in the last
    turn): as many as make them ``share`` of records + them, each a base record's image and question with options
    drawn from ``candidates`` (the right one at a random letter, a hint on about one in :data:`HINT_EVERY`), prompted
    as the MMBench evaluation prompts (:func:`~neva_tools.evalsets.mmbench.build_prompt`), answered by the right
    option's text (the base record's answer)."""
    if not 0.0 <= share < 1.0:
        raise NevaError(f"the multiple-choice share must be in [0, 1), found {share}")
    rng = random.Random(seed)
    order = rng.sample(records, len(records))
    out = []
    for i in range(round(len(records) * share / (1.0 - share)) if records else 0):
        record = order[i % len(order)]
        kind, answer = record["kind"], record["conversations"][-1]["value"]
        if kind not in candidates or answer not in candidates[kind]:
            raise NevaError(f"training record {record.get('id', i)}: kind {kind!r} with answer {answer!r} is not among "
                            f"the candidates {candidates}")  # fmt: skip
        options, at = draw_options(rng, candidates[kind], answer)
        question = Question(index=i, question=synthetic.QUESTIONS[kind],
                            hint=HINT if rng.randrange(HINT_EVERY) == 0 else None,
                            options=dict(zip(LETTERS, options, strict=False)), answer=LETTERS[at], category=kind,
                            l2_category=ABILITY, split="train", image="", row=0)  # fmt: skip
        out.append({"id": f"mc-{i}-{record.get('id', i)}", "image": record["image"], "kind": kind,
                    "conversations": [{"from": "human", "value": f"<image>\n{build_prompt(question)}"},
                                      {"from": "gpt", "value": answer}]})  # fmt: skip
    return out


def corpus(candidates: dict[str, list[str]]) -> list[str]:
    """Tokenizer text of the multiple-choice format: the instruction, the hint and every ``X. option`` line."""
    lines = [ASK_EN, HINT]
    for choices in candidates.values():
        lines += [f"{letter}. {choice}" for letter in LETTERS for choice in choices]
    return lines


def mmbench_rows(heldout: Path, images: Path, candidates: dict[str, list[str]], seed: int = 0) -> list[dict[str, Any]]:
    """The MMBench rows of the held-out records in ``heldout`` (images under ``images``), in record order."""
    records = json.loads(Path(heldout).read_text())
    rng = random.Random(seed)
    per_kind: dict[str, int] = {}
    image_row: dict[str, int] = {}
    rows = []
    for index, record in enumerate(records):
        kind, answer = record["kind"], record["conversations"][-1]["value"]
        where = f"{heldout}: record {record.get('id', index)}"
        if kind not in candidates or answer not in candidates[kind]:
            raise NevaError(f"{where}: kind {kind!r} with answer {answer!r} is not among the candidates {candidates}")
        options, at = draw_options(rng, candidates[kind], answer, per_kind.get(kind, 0))  # A, B, … cycle per kind
        per_kind[kind] = per_kind.get(kind, 0) + 1
        name = record["image"]
        if name in image_row:
            image = str(image_row[name])  # VLMEvalKit's files: a later question names the row holding its image
        else:
            image_row[name] = index
            image = base64.b64encode((Path(images) / name).read_bytes()).decode()
        rows.append({"index": index, "question": synthetic.QUESTIONS[kind],
                     "hint": HINT if index % HINT_EVERY == 0 else "", **dict(zip(LETTERS, options, strict=False)),
                     "answer": LETTERS[at], "category": kind, "l2-category": ABILITY, "split": SPLIT,
                     "image": image})  # fmt: skip
    return rows


def write_tsv(path: Path, rows: list[dict[str, Any]]) -> Path:
    """``rows`` as an MMBench TSV (tab-separated, a header, empty cells for missing keys), written atomically."""
    out = io.StringIO()
    writer = csv.DictWriter(out, HEADER, delimiter="\t", lineterminator="\n", restval="", extrasaction="raise")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(out.getvalue(), encoding="utf-8")
    return path


def command(final: Path, tsv: Path, output: Path, circular: bool = True) -> str:
    """The ``neva eval --benchmark mmbench`` line that reproduces one of :func:`evaluate`'s runs."""
    flags = "" if circular else " --no-circular"
    return (f"neva eval --model {final} --benchmark mmbench {tsv} --output {output}{flags} --batch-size {BATCH_SIZE} "
            f"--max-new-tokens {MAX_NEW_TOKENS} --overwrite")  # fmt: skip


def evaluate(final: Path, clip: Path, tsv: Path, out: Path, template: str) -> dict[str, Any]:
    """Ask ``tsv`` with CircularEval, then score it plainly (``neva eval --benchmark mmbench``'s code path, in this
    process); reports and per-question files go to ``out/circular*`` and ``out/plain*``. The plain run resumes from a
    copy of the circular run's answer log (its questions are the circular run's first rotations), so it asks nothing
    again, as ``neva eval --no-circular`` after a circular run on the same log would. Returns the demo's summary."""
    from neva_tools.evalsets.mmbench_eval import MMBenchSettings, check_outputs, evaluate_mmbench, output_paths
    from neva_tools.evalsets.table import format_table
    from neva_tools.inference.load import load_neva
    from neva_tools.inference.session import inference_session

    reports, outputs = {}, {"circular": out / "circular.json", "plain": out / "plain.json"}
    for output in outputs.values():
        check_outputs(output, overwrite=True)
    with inference_session(1, "eval"):
        loaded = load_neva(final, vision=clip, template=template)
        for name, output in outputs.items():
            if name == "plain":
                with atomic_path(output_paths(output)["answers"]) as tmp:
                    shutil.copyfile(output_paths(outputs["circular"])["answers"], tmp)
            settings = MMBenchSettings(circular=name == "circular", batch_size=BATCH_SIZE,
                                       max_new_tokens=MAX_NEW_TOKENS, resume=name == "plain")  # fmt: skip
            reports[name] = evaluate_mmbench(loaded, tsv, output, settings, overwrite=True)
    circular, plain = reports["circular"], reports["plain"]
    return {
        "overall_circular": circular["table"][SPLIT]["Overall"], "overall_plain": plain["table"][SPLIT]["Overall"],
        "questions": circular["questions"], "scored": circular["scored"], "rows_asked": circular["rows_asked"],
        "correct_circular": circular["correct"], "correct_plain": plain["correct"],
        "asked_circular": circular["asked_this_run"], "asked_plain": plain["asked_this_run"],
        "unmatched_circular": circular["unmatched"]["count"], "unmatched_plain": plain["unmatched"]["count"],
        "table": circular["table"], "table_plain": plain["table"], "printed": format_table(circular["table"]),
        "tsv": str(tsv), "report": str(outputs["circular"]), "predictions": circular["files"]["predictions"],
        "report_plain": str(outputs["plain"]), "predictions_plain": plain["files"]["predictions"],
        "command": command(final, tsv, outputs["circular"]),
        "command_plain": command(final, tsv, outputs["plain"], circular=False),
    }  # fmt: skip
