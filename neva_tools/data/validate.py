"""``neva data validate``: check every record of a LLaVA-format dataset and report every problem.

Each problem names the file, the line (JSONL) or index (JSON), the record id, what is wrong and what
was found. With a tokenizer and a template, each record is also rendered and tokenized exactly as
training will do it, so a sequence that would exceed ``max_seq_length`` after image expansion (or that
the template cannot render) is reported here instead of being dropped or truncated silently later. With an image
layout (``--image-aspect-ratio anyres``..., :mod:`neva_tools.data.anyres`) each image counts the embeddings it
becomes in training (its size is read from the file when it is tiled).
"""

from __future__ import annotations

import math
import multiprocessing
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from neva_tools.data.anyres import ImageLayout, sample_image_tokens
from neva_tools.data.records import (
    IMAGE_PLACEHOLDER,
    ROLES,
    VIDEO_PLACEHOLDER,
    Record,
    RecordError,
    iter_records,
    media_path_problem,
    media_problems,
    resolve_media,
)
from neva_tools.data.video import VideoError, VideoSampling, clip_tokens, sampled_frames
from neva_tools.errors import NevaError
from neva_tools.utils.log import progress

#: Every kind of problem the validator reports.
KINDS = (
    "unparsable_json",
    "not_utf8",
    "too_deep",
    "not_an_object",
    "missing_conversations",
    "bad_turn",
    "unknown_role",
    "roles_not_alternating",
    "empty_turn",
    "bad_image_field",
    "bad_text",
    "image_outside_folder",
    "image_count_mismatch",
    "image_in_answer",
    "image_missing",
    "image_unreadable",
    "bad_video_field",
    "video_count_mismatch",
    "video_in_answer",
    "video_outside_folder",
    "video_missing",
    "video_unreadable",
    "video_too_short",
    "template_error",
    "too_long",
)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one record."""

    file: str
    location: str
    record_id: str | None
    kind: str
    message: str
    found: str = ""

    def __str__(self) -> str:
        rid = f" (id {_printable(self.record_id)})" if self.record_id is not None else ""
        found = f" — found: {_printable(self.found)}" if self.found else ""
        return f"{_printable(self.file)}:{self.location}{rid}: {self.kind}: {_printable(self.message, 600)}{found}"


def _printable(text: str, limit: int = 200) -> str:
    """``text`` safe to print: characters that are not printable (control characters, lone surrogates from bytes
    that are not UTF-8) escaped, and at most ``limit`` characters."""
    if len(text) > limit:
        text = text[:limit] + "…"
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode() for c in text)


@dataclass
class Settings:
    """What to check beyond the structure."""

    image_folder: str | None = None
    tokenizer: str | None = None
    template: str | None = None
    max_seq_length: int | None = None
    image_tokens: int = 576
    decode_images: bool = True
    layout: ImageLayout | None = None  # counts each image's embeddings (AnyRes); None: image_tokens each
    allow_outside: bool = False  # image paths may leave image_folder (absolute, ..); without a folder they always may
    im_start_end: bool | tuple[str, str] = False  # the two tokens around each image (model.mm_cfg.use_im_start_end)
    video: VideoSampling = field(default_factory=VideoSampling)  # how clips are sampled (model.data video keys)
    video_folder: str | None = None  # what video paths resolve against (model.data.video_folder); None: image_folder


@dataclass
class Report:
    """The validation result: problems, counts and token-length statistics."""

    records: int = 0
    images: int = 0
    videos: int = 0
    text_only: int = 0
    invalid_records: int = 0
    problems: list[Problem] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no record has a problem."""
        return not self.problems

    def by_kind(self) -> dict[str, int]:
        """Problem counts per kind."""
        return dict(sorted(Counter(p.kind for p in self.problems).items()))

    def length_stats(self) -> dict[str, int]:
        """p50 / p95 / max token length after image expansion (empty without a tokenizer)."""
        if not self.lengths:
            return {}
        ordered = sorted(self.lengths)

        def pct(q: float) -> int:
            return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]

        return {"p50": pct(0.5), "p95": pct(0.95), "max": ordered[-1]}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary with every problem."""
        return {
            "ok": self.ok,
            "records": self.records,
            "images": self.images,
            "videos": self.videos,
            "text_only": self.text_only,
            "invalid_records": self.invalid_records,
            "invalid_by_kind": self.by_kind(),
            "token_length": self.length_stats(),
            "problems": [asdict(p) for p in self.problems],
        }


_TOKENIZER_CACHE: dict[str, Any] = {}


def _tokenizer(path: str) -> Any:
    from neva_tools.tokenizer.text import TextTokenizer

    if path not in _TOKENIZER_CACHE:
        _TOKENIZER_CACHE[path] = TextTokenizer(path)
    return _TOKENIZER_CACHE[path]


def _structure(record: Record, add: Any) -> list[tuple[str, str]] | None:
    """Check the conversation structure; return (role, text) turns, or None when unusable."""
    conversations = record.raw.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        add("missing_conversations", "'conversations' must be a non-empty list", repr(conversations)[:80])
        return None
    turns = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            add("bad_turn", f"turn {i} must be an object with a string 'value'", repr(turn)[:80])
            return None
        role = ROLES.get(str(turn.get("from")))
        if role is None:
            add("unknown_role", f"turn {i} has an unknown 'from' (use human, gpt or system)", repr(turn.get("from")))
            return None
        if not turn["value"].strip():
            add("empty_turn", f"turn {i} ({turn.get('from')}) is empty", repr(turn["value"]))
        turns.append((role, turn["value"]))
    body = turns[1:] if turns[0][0] == "system" else turns
    expected = ["user", "assistant"] * (len(body) // 2 + 1)
    roles = [r for r, _ in body]
    if not body or roles != expected[: len(roles)] or roles[-1] != "assistant":
        add("roles_not_alternating", "turns must alternate human/gpt, start with human and end with gpt",
            " → ".join(roles) or "(no turns)")  # fmt: skip
    for i, (role, text) in enumerate(body):
        if role == "assistant" and IMAGE_PLACEHOLDER in text:
            add("image_in_answer", f"<image> appears in answer turn {i}; it belongs in a human turn", text[:80])
        if role == "assistant" and VIDEO_PLACEHOLDER in text:
            add("video_in_answer", f"<video> appears in answer turn {i}; it belongs in a human turn", text[:80])
    return turns


def check_record(record: Record | RecordError, settings: Settings) -> tuple[list[Problem], dict[str, int]]:
    """All problems of one record, and its counts (images, videos, text_only, length)."""
    if isinstance(record, RecordError):
        return [Problem(record.source, record.location, None, record.kind, record.message, record.found)], {}
    problems: list[Problem] = []
    rid = str(record.raw["id"]) if "id" in record.raw else None

    def add(kind: str, message: str, found: str = "") -> None:
        problems.append(Problem(record.source, record.location, rid, kind, message, found))

    images, video = record.images, record.video
    stats = {"images": len(images), "videos": int(video is not None), "text_only": int(not images and not video)}
    media = media_problems(record)
    for kind, message, found in media:
        add(kind, message, found)
    bad_field = any(kind == "bad_image_field" for kind, _, _ in media)
    if bad_field:
        images = []  # what the fields name is unknown: no image or placeholder check
    turns = _structure(record, add)
    if turns is not None and not bad_field:
        placeholders = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
        if placeholders != len(images):
            add("image_count_mismatch", f"{placeholders} <image> placeholders but {len(images)} images",
                f"image(s): {images}")  # fmt: skip
    layout = settings.layout
    need_sizes = layout is not None and layout.tiles_images(len(images))
    sizes: list[tuple[int, int] | None] = []
    for path in images:
        full = resolve_media(path, settings.image_folder)
        sizes.append(None)
        outside = media_path_problem(path, settings.image_folder, settings.allow_outside)
        if outside is not None:
            add("image_outside_folder", outside, path)
        elif not _is_file(full):
            add("image_missing", "image file not found", str(full))
        elif settings.decode_images or need_sizes:
            from neva_tools.data.images import ImageProcessor, image_size_of

            try:
                if settings.decode_images:
                    img = ImageProcessor().open(full)
                    sizes[-1] = (img.height, img.width)
                else:
                    sizes[-1] = image_size_of(full)
            except NevaError as exc:
                add("image_unreadable", "image cannot be decoded", str(exc))
    frames = _check_video(record, settings, media, add)
    if turns is not None and not problems and settings.tokenizer and settings.template:
        from neva_tools.data.templates import tokenize_conversation

        try:
            tok = tokenize_conversation(record.media_turns(), settings.template, _tokenizer(settings.tokenizer),
                                        where=record.where(), im_start_end=settings.im_start_end)  # fmt: skip
        except NevaError as exc:
            add("template_error", f"template {settings.template!r} cannot render this record", str(exc))
        else:
            counts = sample_image_tokens(layout, sizes) if layout is not None else None
            if frames is not None:
                counts = [clip_tokens(frames, layout, settings.image_tokens)]
            length = tok.expanded_length(counts if counts is not None else settings.image_tokens)
            stats["length"] = length
            if settings.max_seq_length is not None and length > settings.max_seq_length:
                found = f"{len(tok.input_ids)} text tokens + {tok.num_images} images × {settings.image_tokens}"
                if counts is not None:
                    found = f"{len(tok.input_ids)} text tokens + images of {', '.join(map(str, counts))} tokens"
                add("too_long", f"{length} tokens after image expansion > max_seq_length {settings.max_seq_length}",
                    found)  # fmt: skip
    return problems, stats


def _check_video(record: Record, settings: Settings, media: list[tuple[str, str, str]], add: Any) -> int | None:
    """The frames sampled from the record's video (header only unless ``decode_images``), or None when it has none
    or it cannot be used (each reason added as a problem: outside the folder, missing, unreadable, too short)."""
    video = record.video
    if video is None or any(kind in ("bad_video_field", "video_count_mismatch") for kind, _, _ in media):
        return None
    folder = settings.video_folder if settings.video_folder is not None else settings.image_folder
    full = resolve_media(video, folder)
    outside = media_path_problem(video, folder, settings.allow_outside)
    if outside is not None:
        add("video_outside_folder", outside.replace("image", "video"), video)
        return None
    if not _is_file(full):
        add("video_missing", "video file not found", str(full))
        return None
    try:
        frames, _ = sampled_frames(full, settings.video, decode=settings.decode_images)
    except VideoError as exc:
        add(exc.kind, "video cannot be used", str(exc))
        return None
    return frames


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False for a path the system refuses (too long, NUL)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


_POOL_SETTINGS: Settings | None = None  # a pool worker's settings, sent once (not with every record)


def _init_worker(settings: Settings) -> None:
    global _POOL_SETTINGS
    _POOL_SETTINGS = settings


def _check(record: Record | RecordError) -> tuple[list[Problem], dict[str, int]]:
    return check_record(record, _POOL_SETTINGS or Settings())


def validate(paths: Iterable[str | os.PathLike], settings: Settings, workers: int = 1, *,
             report: Report | None = None, show_progress: bool = True) -> Report:  # fmt: skip
    """Validate annotation files; ``workers > 1`` checks records (image decoding, tokenization) in a pool.

    The records of ``paths`` are added to ``report`` when given (several datasets with different settings, one
    report). A tokenizer that cannot be loaded is one error about the tokenizer, before any record is read.
    """
    if settings.template and not settings.tokenizer:
        raise NevaError("--template needs --tokenizer to check token lengths")
    if settings.template:
        from neva_tools.data.templates import get_template

        get_template(settings.template)
    if settings.tokenizer:
        try:
            _tokenizer(settings.tokenizer)
        except NevaError as exc:
            raise NevaError(f"cannot check token lengths: {exc}; no record was checked (the tokenizer is a "
                            "sentencepiece .model or a Hugging Face tokenizer directory)") from None  # fmt: skip
    if settings.image_folder is not None and not Path(settings.image_folder).is_dir():
        raise NevaError(f"--image-folder {settings.image_folder} is not a directory")
    report = Report() if report is None else report
    items = (record for path in paths for record in iter_records(path))
    pool = None
    if workers > 1:
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(settings,))
    try:
        results = pool.imap(_check, items, chunksize=256) if pool else (check_record(r, settings) for r in items)
        for problems, stats in progress(results, desc="validate", unit="record", disable=not show_progress):
            report.records += 1
            report.images += stats.get("images", 0)
            report.videos += stats.get("videos", 0)
            report.text_only += stats.get("text_only", 0)
            if "length" in stats:
                report.lengths.append(stats["length"])
            if problems:
                report.invalid_records += 1
                report.problems.extend(problems)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return report


def format_report(report: Report, max_problems: int = 50) -> str:
    """The human-readable report: problems first, then the summary table."""
    lines = [str(p) for p in report.problems[:max_problems]]
    if len(report.problems) > max_problems:
        lines.append(f"… and {len(report.problems) - max_problems} more problems (use --json for all)")
    rows = [("records", report.records), ("images", report.images), ("videos", report.videos),
            ("text-only", report.text_only), ("invalid records", report.invalid_records)]  # fmt: skip
    rows += [(f"  {kind}", n) for kind, n in report.by_kind().items()]
    rows += [(f"tokens {k}", v) for k, v in report.length_stats().items()]
    width = max(len(name) for name, _ in rows)
    lines += ["", *(f"{name:<{width}}  {value}" for name, value in rows)]
    lines.append("OK: every record is valid" if report.ok else f"FAILED: {report.invalid_records} invalid records")
    return "\n".join(lines)
