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
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neva_tools.errors import NevaError

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
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

    def media_turns(self) -> list[Turn]:
        """The turns as the model sees them: a video record's ``<video>`` is its one media placeholder (``<image>``,
        whose embeddings are the clip's frames, :mod:`neva_tools.data.video`)."""
        turns = self.turns()
        if self.video is None:
            return turns
        return [Turn(t.role, t.text.replace(VIDEO_PLACEHOLDER, IMAGE_PLACEHOLDER)) for t in turns]

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

    @property
    def kind(self) -> str:
        """The problem kind ``neva data validate`` reports it as."""
        if self.message.startswith("not UTF-8"):
            return "not_utf8"
        if self.message.startswith("nested deeper"):
            return "too_deep"
        return "not_an_object" if "not a JSON object" in self.message else "unparsable_json"


@dataclass
class Annotations:
    """All records of one annotation file, plus the ones that failed to parse."""

    path: Path
    records: list[Record] = field(default_factory=list)
    errors: list[RecordError] = field(default_factory=list)


def _snippet(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


#: Deepest nesting of lists/objects a record may have (a LLaVA record has 4 levels; deeper input is hostile and would
#: exhaust the recursion of the JSON parser and of everything that walks the record).
MAX_DEPTH = 64
_BOM = b"\xef\xbb\xbf"
_SURROGATE = re.compile("[\ud800-\udfff]")
_WS = re.compile(r"[ \t\n\r]*")


def _depth_exceeds(value: Any, limit: int = MAX_DEPTH) -> bool:
    """True when ``value`` nests lists/dicts deeper than ``limit`` (iterative: safe at any depth)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _not_utf8(raw: bytes, base: int = 0) -> str:
    """What is wrong with undecodable ``raw`` (its first bad byte, at offset ``base`` + its position)."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        byte = raw[exc.start : exc.start + 1].hex()
        return f"not UTF-8 (byte 0x{byte} at byte offset {base + exc.start}: {exc.reason}); re-encode the file as UTF-8"
    return "not UTF-8"


def _parse(text: str | bytes) -> tuple[Any, str | None]:
    """``(value, None)`` or ``(None, why it is no record)`` for one JSON value (a JSONL line)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"unparsable JSON ({exc.msg})"
    except RecursionError:
        return None, f"nested deeper than {MAX_DEPTH} levels"
    if _depth_exceeds(value):
        return None, f"nested deeper than {MAX_DEPTH} levels"
    return value, None


def _iter_json_list(path: Path, raw: bytes) -> Iterator[Record | RecordError]:
    """The records of a JSON list, element by element: a record with bytes that are not UTF-8, or nested too deep,
    is reported with its index and line and the others are read; a syntax error ends the file (the records before
    it are yielded)."""
    offset = len(_BOM) if raw.startswith(_BOM) else 0
    text = raw[offset:].decode("utf-8", errors="surrogateescape")  # bad bytes stay visible as U+DC80..U+DCFF
    decoder = json.JSONDecoder()
    pos = _WS.match(text, 0).end() + 1  # after "["
    line, counted = 1, 0

    def line_at(at: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, at)
        counted = at
        return line

    i = 0
    while True:
        pos = _WS.match(text, pos).end()
        if i == 0 and text.startswith("]", pos):
            break
        where = f"index {i} (line {line_at(pos)})"
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            bad = exc.pos < len(text) and "\udc80" <= text[exc.pos] <= "\udcff"
            why = "a byte that is not UTF-8" if bad else exc.msg
            yield RecordError(str(path), where, f"unparsable JSON at line {exc.lineno}, column {exc.colno} ({why}); "
                              "the records after it were not read", _snippet(text[exc.pos : exc.pos + 40]))  # fmt: skip
            return
        except RecursionError:
            yield RecordError(str(path), where, f"nested deeper than {MAX_DEPTH} levels; the records after it were not "
                              "read")  # fmt: skip
            return
        bad = _SURROGATE.search(text, pos, end)
        if bad is not None and "\udc80" <= bad.group() <= "\udcff":
            base = offset + len(text[: bad.start()].encode("utf-8", errors="surrogateescape"))
            raw_at = raw[base : base + 1].hex()
            yield RecordError(str(path), where, f"not UTF-8 (byte 0x{raw_at} at byte offset {base}, line "
                              f"{line_at(bad.start())}); re-encode the file as UTF-8")  # fmt: skip
        elif _depth_exceeds(item):
            yield RecordError(str(path), where, f"nested deeper than {MAX_DEPTH} levels")
        elif isinstance(item, dict):
            yield Record(str(path), f"index {i}", item, i)
        else:
            yield RecordError(str(path), f"index {i}", "record is not a JSON object", _snippet(repr(item)))
        i += 1
        pos = _WS.match(text, end).end()
        if text.startswith(",", pos):
            pos += 1
            continue
        if text.startswith("]", pos) and not text[pos + 1 :].strip():
            break
        found = _snippet(text[pos : pos + 40]) if pos < len(text) else "end of file"
        yield RecordError(str(path), f"after index {i - 1} (line {line_at(min(pos, len(text)))})",
                          "unparsable JSON (expected ',' or the closing ']')", found)  # fmt: skip
        return


def iter_records(path: str | os.PathLike) -> Iterator[Record | RecordError]:
    """Yield the records of a LLaVA JSON (a list) or JSONL file, or a ``RecordError`` per unparsable entry.

    A UTF-8 byte-order mark is skipped; a JSONL line (a JSON record) that is not UTF-8 or nests deeper than
    :data:`MAX_DEPTH` is one ``RecordError`` naming its line (and byte offset), and the rest is read. A file without
    any entry (empty, ``[]``, blank lines) is a ``NevaError``: an empty dataset is a mistake.
    """
    empty = True
    for item in _iter_entries(Path(path)):
        empty = False
        yield item
    if empty:
        raise NevaError(f"annotation file {path} holds no records (it is empty, an empty JSON list or blank lines): "
                        "a dataset needs at least one; check that the right file is given and was written "
                        "completely")  # fmt: skip


def _iter_entries(path: Path) -> Iterator[Record | RecordError]:
    """The entries of ``iter_records``."""
    if not path.is_file():
        raise NevaError(f"annotation file {path} does not exist")
    with open(path, "rb") as fh:
        head = fh.read(4096)
    if head.startswith(_BOM):
        head = head[len(_BOM) :]
    if head.lstrip().startswith(b"["):
        yield from _iter_json_list(path, path.read_bytes())
        return
    with open(path, "rb") as fh:
        index, offset = 0, 0
        for lineno, raw in enumerate(fh, start=1):
            start, offset = offset, offset + len(raw)
            if lineno == 1 and raw.startswith(_BOM):
                raw, start = raw[len(_BOM) :], start + len(_BOM)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                found = _snippet(raw.decode("utf-8", errors="backslashreplace").strip())
                yield RecordError(str(path), f"line {lineno}", _not_utf8(raw, start), found)
                continue
            if not line.strip():
                continue
            item, why = _parse(line)
            if why is not None:
                yield RecordError(str(path), f"line {lineno}", why, _snippet(line.strip()))
            elif isinstance(item, dict):
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


def media_problems(record: Record) -> list[tuple[str, str, str]]:
    """``(kind, message, found)`` for what training cannot use in a record besides its structure: a malformed
    ``image`` / ``images`` (``bad_image_field``), text no tokenizer encodes (``bad_text``: unpaired surrogates), a
    malformed ``video`` or one next to images (``bad_video_field``) and ``<video>`` placeholders that are not exactly
    one for the record's video (``video_count_mismatch``, which would otherwise train as the literal text)."""
    raw, out = record.raw, []
    image, images = raw.get("image"), raw.get("images")
    if image is not None and (not isinstance(image, str) or not image):
        out.append(("bad_image_field", "'image' must be one image path (a non-empty string)", _snippet(repr(image))))
    if images is not None and (not isinstance(images, list) or not all(isinstance(x, str) and x for x in images)):
        out.append(("bad_image_field", "'images' must be a list of image paths (non-empty strings)",
                    _snippet(repr(images))))  # fmt: skip
    if image is not None and images is not None:
        out.append(("bad_image_field", "the record has both 'image' and 'images'; keep one", ""))
    conversations = raw.get("conversations")
    tagged = isinstance(conversations, list) and any(
        isinstance(t, dict) and isinstance(t.get("value"), str) and VIDEO_PLACEHOLDER in t["value"]
        for t in conversations
    )
    texts = [t["value"] for t in conversations if isinstance(t, dict) and isinstance(t.get("value"), str)] if (
        isinstance(conversations, list)) else []  # fmt: skip
    bad = next((m for m in map(_SURROGATE.search, texts) if m is not None), None)
    if bad is not None:
        out.append(("bad_text", "a turn has an unpaired surrogate (a \\ud800-\\udfff escape), which no tokenizer can "
                    "encode", _snippet(repr(bad.string[max(0, bad.start() - 20) : bad.start() + 20]))))  # fmt: skip
    video = raw.get("video")
    tags = sum(t["value"].count(VIDEO_PLACEHOLDER) for t in conversations
               if isinstance(t, dict) and isinstance(t.get("value"), str)) if tagged else 0  # fmt: skip
    if video is not None and (not isinstance(video, str) or not video):
        out.append(("bad_video_field", "'video' must be one video path (a non-empty string)", _snippet(repr(video))))
    elif video is not None and (image is not None or images is not None):
        out.append(("bad_video_field", "the record has both a 'video' and images; give them as two records",
                    _snippet(repr(video))))  # fmt: skip
    elif video is not None and tags != 1:
        out.append(("video_count_mismatch", f"{tags} <video> placeholders for one video (exactly one is needed)",
                    _snippet(repr(video))))  # fmt: skip
    elif video is None and tags:
        out.append(("video_count_mismatch", f"{tags} <video> placeholders but the record has no 'video'",
                    VIDEO_PLACEHOLDER))  # fmt: skip
    return out


def media_path_problem(path: str, image_folder: str | os.PathLike | None, allow_outside: bool = False) -> str | None:
    """Why a record's image path is refused, or None: with an image folder a path must stay inside it (no absolute
    path, no ``..`` above it) unless ``allow_outside``; without one, any path is taken as it is. The check is on the
    path as written (a symlink inside the folder may point elsewhere)."""
    if "\x00" in path:
        return "the image path contains a NUL character"
    if allow_outside or image_folder is None:
        return None
    hint = "keep the images inside it, or allow it (--allow-outside, model.data.allow_outside_image_folder)"
    if os.path.isabs(path):
        return f"absolute image path with an image folder ({_snippet(str(image_folder))}); {hint}"
    norm = os.path.normpath(path)
    if norm == os.pardir or norm.startswith(os.pardir + os.sep):
        return f"the image path leaves the image folder ({_snippet(str(image_folder))}); {hint}"
    return None
