"""MMBench-layout TSVs (MMBench EN/CN, CCBench, as VLMEvalKit publishes them): questions, prompts, CircularEval.

Columns: ``index`` (integer), ``question``, ``hint``, option columns ``A``, ``B``, … (``C``–``E`` may be empty),
``answer`` (a letter; without the column every question is predicted only), ``category``, ``l2-category``,
``split`` and ``image`` (base64; a value of at most 64 characters is the ``index`` of the row that holds the image,
as VLMEvalKit's files share images between a question's copies). Empty cells and pandas' missing-value spellings
(``NA``, ``None``, ``nan`` …) are missing, as VLMEvalKit reads the file with pandas.

CircularEval (VLMEvalKit's ``mcq_circular_eval``): a question is asked once per rotation of its options; the
rotations of the question with index ``i`` have indices ``i + k·10⁶`` (its *group*, ``index % 10⁶``), and the group is
correct only if every rotation's answer is. Files that already hold the rotations (VLMEvalKit's MMBench TSVs) are
used as they are; a file with no index ≥ 10⁶ is rotated here (option ``j`` of rotation ``k`` is option ``j + k`` of
the question). ``circular=False`` asks the questions of index < 10⁶ only, once each.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import re
import string
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from neva_tools.data.images import MAX_PIXELS, to_rgb
from neva_tools.errors import NevaError

GROUP = 1_000_000  #: rotations of question ``i`` have indices ``i + k * GROUP``
#: What pandas' ``read_csv`` reads as missing (its default ``na_values``), hence VLMEvalKit too.
MISSING = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                     "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})  # fmt: skip
REQUIRED = ("index", "question", "A", "B", "image")
ASK_EN = "Answer with the option's letter from the given choices directly."
ASK_CN = "请直接回答选项字母。"
_CJK = re.compile("[\u4e00-\u9fa5]")  # VLMEvalKit's cn_string
_IMAGE_REF_LEN = 64


@dataclass(frozen=True)
class Question:
    """One row of an MMBench-layout TSV (one rotation of a question)."""

    index: int
    question: str
    hint: str | None
    options: dict[str, str]  # letter -> text, in letter order
    answer: str | None  # None: predict only
    category: str | None  # None: no such column (CCBench has no l2-category)
    l2_category: str | None
    split: str
    image: str  # base64
    row: int  # line of the TSV (the header is line 1)

    @property
    def group(self) -> int:
        """VLMEvalKit's ``g_index``: the index of the question this row is a rotation of."""
        return self.index % GROUP

    @property
    def is_main(self) -> bool:
        return self.index == self.group


def _cell(row: dict[str, str], key: str) -> str | None:
    value = row.get(key)
    return None if value is None or value in MISSING else value


def read_tsv(path: str | Path) -> list[Question]:
    """The rows of an MMBench-layout TSV; a missing column, a bad index or answer, or no image is a ``NevaError``
    naming the file, the line and the column."""
    path = Path(path)
    if not path.is_file():
        raise NevaError(f"MMBench TSV {path} does not exist")
    csv.field_size_limit(sys.maxsize)  # base64 images exceed csv's 128 KiB default
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise NevaError(f"{path}: column(s) {', '.join(missing)} missing from the header (found: "
                            f"{', '.join(header[:20])}); an MMBench TSV has index, question, hint, A, B, C, D, answer, "
                            "category, l2-category, split and image (base64)")  # fmt: skip
        letters = [c for c in string.ascii_uppercase if c in header]
        rows = [_question(path, reader.line_num, row, letters, "answer" in header) for row in reader]
    if not rows:
        raise NevaError(f"{path} holds no questions")
    _resolve_images(path, rows)
    seen: dict[int, int] = {}
    for q in rows:
        if q.index in seen:
            raise NevaError(f"{path}:line {q.row}: index {q.index} repeats line {seen[q.index]}; indices must be "
                            "unique")  # fmt: skip
        seen[q.index] = q.row
    return rows


def _question(path: Path, line: int, row: dict[str, str], letters: list[str], answered: bool) -> Question:
    where = f"{path}:line {line}"
    if None in row:
        raise NevaError(f"{where}: more cells than the header has columns (a tab inside a cell?)")
    raw = _cell(row, "index")
    try:
        index = int(raw or "")
    except ValueError:
        raise NevaError(f"{where}: column index must be an integer, found {raw!r}") from None
    if index < 0:
        raise NevaError(f"{where}: column index must be >= 0, found {index}")
    options = {c: v for c in letters if (v := _cell(row, c)) is not None}
    if len(options) < 2:
        raise NevaError(f"{where}: a question needs at least two options (columns A, B …), found {sorted(options)}")
    answer = _cell(row, "answer") if answered else None
    if answer is not None and answer.strip() not in options:
        raise NevaError(f"{where}: column answer is {answer!r}, not one of this question's options "
                        f"{', '.join(options)}")  # fmt: skip
    image = _cell(row, "image")
    if image is None:
        raise NevaError(f"{where}: column image is empty; every MMBench question has a base64 image")
    return Question(index, _cell(row, "question") or "", _cell(row, "hint"), options,
                    answer.strip() if answer else None, _cell(row, "category"), _cell(row, "l2-category"),
                    _cell(row, "split") or "none", image, line)  # fmt: skip


def _resolve_images(path: Path, rows: list[Question]) -> None:
    """Replace image references (another row's index) by that row's image, as VLMEvalKit does."""
    by_index = {q.index: q for q in rows}
    for i, q in enumerate(rows):
        if len(q.image) > _IMAGE_REF_LEN:
            continue
        target = by_index.get(int(q.image)) if q.image.strip().isdigit() else None
        if target is None or len(target.image) <= _IMAGE_REF_LEN:
            raise NevaError(f"{path}:line {q.row}: column image is {q.image!r}: too short for a base64 image and not "
                            "the index of a row holding one")  # fmt: skip
        rows[i] = replace(q, image=target.image)


def decode_image(q: Question, path: str | Path = "TSV") -> Image.Image:
    """The question's image as 8-bit RGB, decoded in memory; a bad image is a ``NevaError`` naming the row."""
    where = f"{path}:line {q.row} (index {q.index}), column image"
    try:
        data = base64.b64decode(q.image, validate=False)
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_PIXELS:
                raise NevaError(f"{where}: the image is {img.width}×{img.height} pixels, above {MAX_PIXELS}")
            img.load()
            return to_rgb(img, where)
    except NevaError:
        raise
    except (binascii.Error, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise NevaError(f"{where}: not a base64-encoded image ({exc})") from None


def build_prompt(q: Question) -> str:
    """VLMEvalKit's LLaVA prompt: hint, question, one ``X. text`` line per option, then the instruction (Chinese when
    the text has Chinese characters). The image goes before it (``<image>\\n``, added by the template step)."""
    text = q.question if q.hint is None else f"{q.hint}\n{q.question}"
    for letter, option in q.options.items():
        text += f"\n{letter}. {option}"
    return text + "\n" + (ASK_CN if _CJK.search(text) else ASK_EN)


def rotations(q: Question) -> Iterator[Question]:
    """The other rotations of ``q`` (index ``q.index + k·10⁶``, ``k`` = 1 … options − 1)."""
    letters = list(q.options)
    texts = list(q.options.values())
    n = len(letters)
    for k in range(1, n):
        options = {letters[j]: texts[(j + k) % n] for j in range(n)}
        answer = None if q.answer is None else letters[(letters.index(q.answer) - k) % n]
        yield replace(q, index=q.index + k * GROUP, options=options, answer=answer)


def questions_to_ask(rows: list[Question], circular: bool) -> list[Question]:
    """The rows to ask: every rotation (``circular``; rotated here when the file holds none), else the questions
    of index < 10⁶. Grouped by question, in file order."""
    main = [q for q in rows if q.is_main]
    if not circular:
        return main
    if all(q.is_main for q in rows):
        return [r for q in rows for r in (q, *rotations(q))]
    present = {q.group for q in main}
    orphans = sorted({q.index for q in rows if q.group not in present})
    if orphans:
        raise NevaError(f"row(s) with index {', '.join(map(str, orphans[:10]))} are rotations of a question the file "
                        "does not hold (index % 1000000); add the question or remove the rows")  # fmt: skip
    order = {g: i for i, g in enumerate(q.group for q in main)}
    return sorted(rows, key=lambda q: (order[q.group], q.index))
