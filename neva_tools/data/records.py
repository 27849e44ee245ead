"""LLaVA-format annotation records (JSON list or JSONL), each with the location it came from.

Shapes accepted as they are: LLaVA-CC3M-Pretrain-595K ``chat.json``, LLaVA-Instruct-150K/665K
(``image`` one path, ``images`` a list, ``video`` a path, or none for text-only), ``conversations`` of
``{"from": "human"|"gpt"|"system", "value": ...}``, optional ``id``, ``width``, ``height``.
Parsing here is lenient (a record that cannot be parsed becomes a ``RecordError``); what a record must
satisfy is checked by ``neva_tools.data.validate``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neva_tools.errors import NevaError

IMAGE_PLACEHOLDER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class Turn:
    """One message: ``role`` is ``user``, ``assistant`` or ``system``."""

    role: str
    text: str


@dataclass
class Record:
    """One annotation record and where it came from (file, 1-based line for JSONL or 0-based index)."""

    source: str
    location: str
    raw: dict[str, Any]
    index: int = 0

    @property
    def id(self) -> str:
        """The record's ``id`` field, or its location when it has none."""
        return str(self.raw.get("id", self.location))

    @property
    def images(self) -> list[str]:
        """Image paths as written in the record (``image`` or ``images``)."""
        if "images" in self.raw and isinstance(self.raw["images"], list):
            return [str(p) for p in self.raw["images"]]
        image = self.raw.get("image")
        return [str(image)] if isinstance(image, str) else []

    @property
    def video(self) -> str | None:
        """The video path, if any."""
        video = self.raw.get("video")
        return str(video) if isinstance(video, str) else None

    def turns(self) -> list[Turn]:
        """The conversation as turns; unknown roles or malformed turns raise ``NevaError`` naming the record."""
        conversations = self.raw.get("conversations")
        if not isinstance(conversations, list):
            raise NevaError(f"{self.where()}: 'conversations' is missing or not a list")
        turns = []
        for i, turn in enumerate(conversations):
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                raise NevaError(f"{self.where()}: turn {i} is not a {{'from': ..., 'value': str}} object")
            role = ROLES.get(str(turn.get("from")))
            if role is None:
                raise NevaError(f"{self.where()}: turn {i} has unknown role {turn.get('from')!r}; use human/gpt/system")
            turns.append(Turn(role, turn["value"]))
        return turns

    def where(self) -> str:
        """``file:line 12 (id abc)`` for error messages."""
        rid = self.raw.get("id")
        return f"{self.source}:{self.location}" + (f" (id {rid})" if rid is not None else "")


@dataclass
class RecordError:
    """A record that could not be parsed at all (bad JSON line, not an object)."""

    source: str
    location: str
    message: str
    found: str = ""

    def where(self) -> str:
        return f"{self.source}:{self.location}"


@dataclass
class Annotations:
    """All records of one annotation file, plus the ones that failed to parse."""

    path: Path
    records: list[Record] = field(default_factory=list)
    errors: list[RecordError] = field(default_factory=list)


def _snippet(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def iter_records(path: str | os.PathLike) -> Iterator[Record | RecordError]:
    """Yield the records of a LLaVA JSON (a list) or JSONL file, or a ``RecordError`` per unparsable entry."""
    path = Path(path)
    if not path.is_file():
        raise NevaError(f"annotation file {path} does not exist")
    with open(path, encoding="utf-8") as fh:
        head = fh.read(4096).lstrip()
    if head.startswith("["):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise NevaError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
        for i, item in enumerate(data):
            if isinstance(item, dict):
                yield Record(str(path), f"index {i}", item, i)
            else:
                yield RecordError(str(path), f"index {i}", "record is not a JSON object", _snippet(repr(item)))
        return
    with open(path, encoding="utf-8") as fh:
        index = 0
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                yield RecordError(str(path), f"line {lineno}", f"unparsable JSON ({exc.msg})", _snippet(line.strip()))
                continue
            if isinstance(item, dict):
                yield Record(str(path), f"line {lineno}", item, index)
                index += 1
            else:
                yield RecordError(str(path), f"line {lineno}", "record is not a JSON object", _snippet(line.strip()))


def load_annotations(path: str | os.PathLike) -> Annotations:
    """All records of ``path`` (see ``iter_records``)."""
    out = Annotations(Path(path))
    for item in iter_records(path):
        (out.records if isinstance(item, Record) else out.errors).append(item)
    return out


def resolve_media(path: str, image_folder: str | os.PathLike | None) -> Path:
    """An image/video path from a record, resolved against the dataset's image folder unless absolute."""
    p = Path(path)
    return p if p.is_absolute() or image_folder is None else Path(image_folder) / p
