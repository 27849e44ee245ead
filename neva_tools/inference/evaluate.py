"""``neva eval``: validation loss, multiple-choice accuracy by likelihood, and short-answer accuracy of generations.

On a LLaVA-format file (the records ``neva train`` reads):

* ``loss``: token-mean cross-entropy of every record's supervised tokens (its answers and end-of-turn tokens) over
  the true vocabulary (``neva_tools.inference.scoring``: the same at any TP and for the Hugging Face export; the
  training log also counts the padded vocabulary rows); records are rendered by ``NevaDataset``, as in training.
* ``choice``: for records with candidate answers (a ``candidates`` list in the record, or ``candidates=`` given per
  record ``kind`` or for all), the candidate whose tokens (answer and end-of-turn, after the conversation so far)
  are most likely (summed log-likelihood) is the prediction; the reference is the record's last answer and must
  be a candidate.
* ``generation``: for records whose last answer is short (at most ``short_answer_words`` words) the model answers
  greedily, ``batch_size`` prompts at a time (``neva_tools.inference.batch``: the answers of one at a time); exact
  match and "contains" (the reference as whole words inside the answer) are computed on normalised text (lower
  case, punctuation removed, spaces collapsed).

Every metric is reported overall and per record ``kind`` when records carry one.

Video records (``"video"`` and ``<video>``, :mod:`neva_tools.data.video`) are scored as training renders them: the
clip's frames sampled with the model's training settings (its config's ``data.base_interval``,
``video_min_frames``, ``video_max_frames``...), one media entry whose tiles are the frames, as ``neva generate
--video`` does; relative video paths are resolved against ``video_folder`` (default: the image folder).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from neva_tools.data.dataset import NevaDataset, collate
from neva_tools.data.images import ImageBatch
from neva_tools.data.records import Record, Turn
from neva_tools.data.registry import DatasetSpec, DatasetUse
from neva_tools.data.templates import IGNORE_INDEX, tokenize_conversation
from neva_tools.data.video import VideoSampling
from neva_tools.errors import NevaError
from neva_tools.inference.batch import Request, generate_batch
from neva_tools.inference.generate import as_image_batch
from neva_tools.inference.load import LoadedNeva, neva_config
from neva_tools.inference.prompt import answer_span, generation_prompt, stop_token_ids
from neva_tools.inference.scoring import token_nll
from neva_tools.utils.log import progress

METRICS = ("loss", "choice", "generation")
Candidates = Mapping[str, Sequence[str]] | Sequence[str] | None


@dataclass(frozen=True)
class EvalSettings:
    """What to compute and how (see the module docstring)."""

    metrics: tuple[str, ...] = METRICS
    batch_size: int = 8  # records per forward pass for the loss, prompts per forward pass for the generations
    max_new_tokens: int = 16  # generation budget per short answer
    short_answer_words: int = 5  # generation metrics only for references up to this many words
    candidates: Candidates = None  # {kind: [answers]} or [answers] for records without their own list

    def __post_init__(self) -> None:
        unknown = sorted(set(self.metrics) - set(METRICS))
        if unknown or not self.metrics:
            raise NevaError(f"unknown metrics {unknown or '(none given)'}; choose from {', '.join(METRICS)}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise NevaError(f"batch_size ({self.batch_size}) and max_new_tokens ({self.max_new_tokens}) must be >= 1")


def normalize_answer(text: str) -> str:
    """Lower case, punctuation replaced by spaces, whitespace collapsed."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def short_answer_scores(generated: str, reference: str) -> tuple[bool, bool]:
    """(exact match, contains): equal normalised texts; the normalised reference as whole words in the answer."""
    got, want = normalize_answer(generated), normalize_answer(reference)
    return got == want, bool(want) and f" {want} " in f" {got} "


def load_candidates(path: str | Path) -> Mapping[str, list[str]] | list[str]:
    """A candidates file: a JSON list of answers for every record, or an object ``{kind: [answers]}``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise NevaError(f"candidates file {path} could not be read as JSON: {exc}") from None
    lists = data.values() if isinstance(data, dict) else [data]
    if not all(isinstance(v, list) and v and all(isinstance(a, str) for a in v) for v in lists):
        raise NevaError(f"{path} must hold a non-empty list of answer strings, or an object mapping each record "
                        f"kind to one, found {json.dumps(data)[:200]}")  # fmt: skip
    return data


@dataclass
class _Tally:
    """Per-kind values of one metric, averaged with ``math.fsum`` (exact means: 60 × 1/6 gives 1/6)."""

    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(self, kind: str, **values: float) -> None:
        bucket = self.values.setdefault(kind, {})
        for name, value in values.items():
            bucket.setdefault(name, []).append(float(value))

    def summary(self) -> dict[str, Any]:
        def rates(bucket: dict[str, list[float]]) -> dict[str, Any]:
            n = len(next(iter(bucket.values()), []))
            return {"questions": n, **{k: math.fsum(v) / n for k, v in bucket.items()}}

        total: dict[str, list[float]] = {}
        for bucket in self.values.values():
            for k, v in bucket.items():
                total.setdefault(k, []).extend(v)
        out = rates(total) if total else {"questions": 0}
        if set(self.values) != {""}:
            out["by_kind"] = {kind: rates(b) for kind, b in self.values.items()}  # in order of appearance
        return out


def _last_round(record: Record) -> tuple[list[Turn], str]:
    """(the turns before the last answer, the last answer); a video's ``<video>`` is its media placeholder."""
    turns = record.media_turns()
    if len(turns) < 2 or turns[-1].role != "assistant":
        raise NevaError(f"{record.where()}: the last turn must be the assistant's answer to score it")
    return turns[:-1], turns[-1].text


def _record_candidates(record: Record, candidates: Candidates) -> list[str] | None:
    own = record.raw.get("candidates")
    if own is not None:
        if not (isinstance(own, list) and own and all(isinstance(a, str) for a in own)):
            raise NevaError(f"{record.where()}: 'candidates' must be a non-empty list of strings, found {own!r}")
        return own
    if candidates is None:
        return None
    if not isinstance(candidates, Mapping):
        return list(candidates)
    kind = str(record.raw.get("kind", ""))
    if kind not in candidates:
        raise NevaError(f"{record.where()}: kind {kind!r} has no candidates list (the candidates name "
                        f"{', '.join(sorted(candidates))}); add it or give the record a 'candidates' list")  # fmt: skip
    return list(candidates[kind])


@dataclass(frozen=True)
class _Question:
    """A record as ``neva eval`` asks it: the conversation before the last answer, that answer, its candidates."""

    record: Record
    context: list[Turn]
    reference: str
    kind: str
    answers: list[str] | None


def _questions(records: Sequence[Record], settings: EvalSettings, data: Path) -> list[_Question]:
    """Every record checked before any model work: last turn an answer, references among candidates."""
    out = []
    for record in records:
        context, reference = _last_round(record)
        answers = _record_candidates(record, settings.candidates) if "choice" in settings.metrics else None
        if answers is not None and reference not in answers:
            raise NevaError(f"{record.where()}: the reference answer {reference!r} is not one of its candidates "
                            f"{answers}")  # fmt: skip
        out.append(_Question(record, context, reference, str(record.raw.get("kind", "")), answers))
    if "choice" in settings.metrics and isinstance(settings.candidates, Mapping):
        unused = sorted(set(settings.candidates) - {q.kind for q in out if "candidates" not in q.record.raw})
        if unused:
            raise NevaError(f"the candidates for kind(s) {', '.join(unused)} match no record of {data}")
    return out


@torch.no_grad()
def candidate_nll(loaded: LoadedNeva, context: Sequence[Turn], images: torch.Tensor | ImageBatch,
                  answers: Sequence[str], where: str = "record") -> torch.Tensor:  # fmt: skip
    """Summed negative log-likelihood of each answer's tokens (answer and end-of-turn) after ``context``."""
    batch = []
    pictures = as_image_batch(loaded.model, images)  # AnyRes tiles and each image's embedding count
    for answer in answers:
        tok = tokenize_conversation([*context, Turn("assistant", answer)], loaded.template, loaded.tokenizer,
                                    where=where, im_start_end=loaded.im_start_end)  # fmt: skip
        length = tok.expanded_length(pictures.tokens.tolist())
        if length > loaded.max_sequence_length:
            raise NevaError(f"{where}: {length} tokens with candidate {answer!r}, more than the model's "
                            f"{loaded.max_sequence_length}")  # fmt: skip
        start, end = answer_span(tok)
        ids, labels = torch.tensor(tok.input_ids), torch.full((len(tok.input_ids) - 1,), IGNORE_INDEX)
        labels[start - 1 : end - 1] = ids[start:end]  # only the answer's tokens are scored
        batch.append({"input_ids": ids[:-1], "labels": labels, **pictures.fields(), "id": answer})
    return token_nll(loaded.model, collate(batch, loaded.tokenizer.pad_id), loaded.vocab_size).sum(dim=1)


@torch.no_grad()
def validation_loss(loaded: LoadedNeva, dataset: NevaDataset, batch_size: int) -> dict[str, Any]:
    """Token-mean loss of all supervised tokens of ``dataset`` over the true vocabulary (and the token count)."""
    total, tokens = 0.0, 0
    for start in progress(range(0, len(dataset), batch_size), desc="loss", unit="batch"):
        b = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))], loaded.tokenizer.pad_id)
        total += float(token_nll(loaded.model, b, loaded.vocab_size).sum())
        tokens += int((b["labels"] != IGNORE_INDEX).sum())
    return {"value": total / max(tokens, 1), "tokens": tokens, "records": len(dataset)}


def _media(dataset: NevaDataset, index: int) -> ImageBatch:
    """Item ``index``'s images (AnyRes tiles) or video (its sampled frames, one entry) as the model takes them."""
    batch = dataset.image_batch(index)
    if batch.tokens is None:
        batch.tokens = torch.full((len(batch),), dataset.image_tokens, dtype=torch.long)
    return batch


def evaluate(loaded: LoadedNeva, data: str | Path, image_folder: str | Path | None,
             settings: EvalSettings | None = None, *,
             video_folder: str | Path | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:  # fmt: skip
    """(report, per-record predictions) of ``loaded`` on the LLaVA-format file ``data``; relative video paths are
    resolved against ``video_folder`` (default: ``image_folder``)."""
    settings = settings or EvalSettings()
    data = Path(data)
    folder = Path(image_folder) if image_folder is not None else None
    video = VideoSampling.from_config(neva_config(loaded.source).get("data"))  # as the model was trained
    dataset = NevaDataset([DatasetUse(DatasetSpec(data.stem, data, folder, loaded.template))], loaded.tokenizer.path,
                          loaded.image_processor, template=loaded.template,
                          max_seq_length=loaded.max_sequence_length, image_tokens=loaded.model.img_seq_len,
                          im_start_end=loaded.im_start_end, video=video, video_folder=video_folder)  # fmt: skip
    if not len(dataset):
        raise NevaError(f"{data} holds no records")
    report: dict[str, Any] = {"model": str(loaded.source), "data": str(data), "template": loaded.template,
                              "records": len(dataset)}  # fmt: skip
    questions = _questions([item.record for item in dataset.items], settings, data)
    if "loss" in settings.metrics:
        report["loss"] = validation_loss(loaded, dataset, settings.batch_size)
    choice, generation, predictions = _Tally(), _Tally(), []
    stops = stop_token_ids(loaded.template, loaded.tokenizer)
    want_choice, want_gen = "choice" in settings.metrics, "generation" in settings.metrics
    pending: list[tuple[_Question, dict[str, Any], Request]] = []  # generations, asked settings.batch_size at a time

    def answer_pending() -> None:
        outs = generate_batch(loaded.model, loaded.tokenizer, [r for _, _, r in pending],
                              batch_size=settings.batch_size, max_new_tokens=settings.max_new_tokens, stop_ids=stops,
                              vocab_size=loaded.vocab_size)  # fmt: skip
        for (q, row, _), out in zip(pending, outs, strict=True):
            row["generated"] = out.text
            exact, contains = short_answer_scores(out.text, q.reference)
            generation.add(q.kind, exact_match=exact, contains=contains)
        pending.clear()

    asked = list(enumerate(questions)) if want_choice or want_gen else []
    for index, q in progress(asked, desc="answers", unit="record"):
        images = _media(dataset, index)
        row: dict[str, Any] = {"id": q.record.id, "kind": q.kind or None, "reference": q.reference}
        if q.answers is not None:
            nll = candidate_nll(loaded, q.context, images, q.answers, q.record.where())
            row["choice"] = q.answers[int(nll.argmin())]
            row["nll"] = dict(zip(q.answers, nll.tolist(), strict=True))
            choice.add(q.kind, accuracy=row["choice"] == q.reference, chance=1 / len(q.answers))
        if want_gen and len(q.reference.split()) <= settings.short_answer_words:
            prompt = generation_prompt(q.context, loaded.template, loaded.tokenizer, where=q.record.where(),
                                       im_start_end=loaded.im_start_end)  # fmt: skip
            pending.append((q, row, Request(prompt.input_ids, images, where=q.record.where())))
            if len(pending) == settings.batch_size:
                answer_pending()
        predictions.append(row)
    if pending:
        answer_pending()
    if want_choice:
        report["choice"] = choice.summary()
    if want_gen:
        report["generation"] = {**generation.summary(), "max_new_tokens": settings.max_new_tokens,
                                "short_answer_words": settings.short_answer_words}  # fmt: skip
    return report, predictions
