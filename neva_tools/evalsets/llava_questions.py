"""LLaVA's evaluation question files in, LLaVA's answer JSONL out, so that LLaVA's scoring scripts run unchanged.

Question files (either layout):

* JSONL, one ``{"question_id", "image", "text", "category"}`` per line, as ``llava/eval/model_vqa_loader.py`` reads
  them (GQA, VQAv2, TextVQA, POPE, MME, SEED …): the prompt is ``text`` after the image (``<image>\\n``);
* a JSON list of ``{"id", "conversations", "image"}`` records, as ``model_vqa_science.py`` reads ScienceQA's
  ``llava_test_CQM-A.json``: the prompt is the first turn without ``<image>``; ``single_pred_prompt`` appends
  "Answer with the option's letter from the given choices directly." (LLaVA-1.5's ``--single-pred-prompt``), and
  the recorded prompt starts with ``<image>\\n`` when the question has an image (ScienceQA's IMG subset is read
  from it).

Each answer line is ``{"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}`` in that order, as
LLaVA writes it: the question's id unchanged, its text, the answer (stripped), a fresh 22-character shortuuid-style
id, the model's name and ``{}``. Lines are appended batch by batch and fsync'd; a rerun skips answered questions.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neva_tools.data.records import IMAGE_PLACEHOLDER, resolve_media
from neva_tools.errors import NevaError
from neva_tools.evalsets.mmbench import ASK_EN
from neva_tools.evalsets.resume import AnswerLog
from neva_tools.evalsets.runner import Item, answer_items, barrier
from neva_tools.inference.generate import Generation
from neva_tools.inference.load import LoadedNeva
from neva_tools.utils.log import global_rank

logger = logging.getLogger(__name__)
ANSWER_KEYS = ("question_id", "prompt", "text", "answer_id", "model_id", "metadata")
#: shortuuid's alphabet (no 0, 1, I, O, l): 57 symbols, 22 of them encode a UUID.
SHORTUUID_ALPHABET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


@dataclass(frozen=True)
class LlavaQuestion:
    """One question: its id (as in the file), the text asked, the prompt recorded, its image (or None)."""

    question_id: int | str
    text: str
    prompt: str
    image: str | None
    category: str | None
    where: str


def short_uuid() -> str:
    """A random 22-character id in shortuuid's alphabet (what ``shortuuid.uuid()`` returns)."""
    value, digits = uuid.uuid4().int, []
    for _ in range(22):
        value, digit = divmod(value, len(SHORTUUID_ALPHABET))
        digits.append(SHORTUUID_ALPHABET[digit])
    return "".join(reversed(digits))


def _question_id(value: Any, where: str) -> int | str:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise NevaError(f"{where}: the question id must be an integer or a string, found {value!r}")
    return value


def read_questions(path: str | Path, *, single_pred_prompt: bool = False) -> list[LlavaQuestion]:
    """The questions of a LLaVA question file (JSONL or a JSON list of conversations); bad lines are a
    ``NevaError`` naming the file, line (or record) and key."""
    path = Path(path)
    if not path.is_file():
        raise NevaError(f"question file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except ValueError as exc:
            raise NevaError(f"{path} is not valid JSON ({exc})") from None
        questions = [_conversation(r, f"{path}:record {i}", single_pred_prompt) for i, r in enumerate(records, 1)]
    else:
        questions = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                questions.append(_jsonl_line(line, f"{path}:line {number}"))
    if not questions:
        raise NevaError(f"{path} holds no questions")
    seen: dict[int | str, str] = {}
    for q in questions:
        if q.question_id in seen:
            raise NevaError(f"{q.where}: question_id {q.question_id!r} repeats {seen[q.question_id]}")
        seen[q.question_id] = q.where
    return questions


def _jsonl_line(line: str, where: str) -> LlavaQuestion:
    try:
        raw = json.loads(line)
    except ValueError as exc:
        raise NevaError(f"{where} is not JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise NevaError(f"{where}: expected a JSON object, found {type(raw).__name__}")
    missing = [k for k in ("question_id", "text") if k not in raw]
    if missing:
        raise NevaError(f"{where}: key(s) {', '.join(missing)} missing; a LLaVA question line has question_id, image, "
                        "text and category")  # fmt: skip
    if not isinstance(raw["text"], str) or not isinstance(raw.get("image", ""), str):
        raise NevaError(f"{where}: 'text' and 'image' must be strings, found {raw['text']!r} / {raw.get('image')!r}")
    category = raw.get("category")
    return LlavaQuestion(_question_id(raw["question_id"], where), raw["text"], raw["text"], raw.get("image") or None,
                         None if category is None else str(category), where)  # fmt: skip


def _conversation(raw: Any, where: str, single_pred_prompt: bool) -> LlavaQuestion:
    if not isinstance(raw, dict) or "id" not in raw or not isinstance(raw.get("conversations"), list):
        raise NevaError(f"{where}: a conversation record needs 'id' and a 'conversations' list")
    first = raw["conversations"][0] if raw["conversations"] else None
    if not isinstance(first, dict) or not isinstance(first.get("value"), str):
        raise NevaError(f"{where}: conversations[0] must be an object with a string 'value'")
    text = first["value"].replace(IMAGE_PLACEHOLDER, "").strip()
    if single_pred_prompt:
        text = f"{text}\n{ASK_EN}"
    image = raw.get("image")
    if image is not None and not isinstance(image, str):
        raise NevaError(f"{where}: 'image' must be a path, found {image!r}")
    prompt = f"{IMAGE_PLACEHOLDER}\n{text}" if image else text
    return LlavaQuestion(_question_id(raw["id"], where), text, prompt, image or None, None, where)


def answer_questions(loaded: LoadedNeva, questions: list[LlavaQuestion], answers: str | Path, *,
                     image_folder: str | Path | None, model_id: str, batch_size: int = 16, max_new_tokens: int = 128,
                     resume: bool = True) -> dict[int | str, dict[str, Any]]:  # fmt: skip
    """Answer every question not yet in ``answers`` (rank 0 appends LLaVA's answer lines); returns every answer line
    by question id."""

    def images(q: LlavaQuestion) -> list[str | Path]:
        return [] if q.image is None else [resolve_media(q.image, image_folder)]

    items = [Item(q.question_id, q.text, lambda q=q: images(q), q.where) for q in questions]
    prompts = {q.question_id: q.prompt for q in questions}

    def row(item: Item, out: Generation) -> dict[str, Any]:
        return {"question_id": item.key, "prompt": prompts[item.key], "text": out.text, "answer_id": short_uuid(),
                "model_id": model_id, "metadata": {}}  # fmt: skip

    with AnswerLog(answers, "question_id", fresh=not resume, write=global_rank() == 0) as log:
        others = sorted({str(r.get("model_id")) for r in log.done.values()} - {model_id})
        if others:
            raise NevaError(f"{answers} holds answers of model {', '.join(others)}, not {model_id}; pass --no-resume "
                            "to start over or choose another --answers-file")  # fmt: skip
        barrier()
        answer_items(loaded, items, log, row, batch_size=batch_size, max_new_tokens=max_new_tokens, desc="questions")
        return dict(log.done)


def read_answers(path: str | Path) -> list[dict[str, Any]]:
    """The lines of a LLaVA answer file (ours or LLaVA's), in order; each needs ``question_id`` and ``text``."""
    path = Path(path)
    if not path.is_file():
        raise NevaError(f"answers file {path} does not exist")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise NevaError(f"{path}:line {number} is not JSON ({exc})") from None
        if not isinstance(row, dict) or "question_id" not in row or not isinstance(row.get("text"), str):
            raise NevaError(f"{path}:line {number}: an answer line needs question_id and a string text")
        rows.append(row)
    return rows
