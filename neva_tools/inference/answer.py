"""Answering prompts: one question about some images, or a JSONL file of them (``neva generate --batch``).

A batch file holds one JSON object per line: ``prompt`` (required; ``<image>`` marks where each image goes, else
the images go first), ``image`` (a path) or ``images`` (a list), and optionally ``id`` and ``system`` (replaces the
template's system prompt). Relative image paths are resolved against ``image_folder``. Any other key is an error.
The answers file has one line per prompt, in order: ``id``, ``prompt``, ``answer``, ``stop``, ``new_tokens``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from neva_tools.data.records import Record, Turn, iter_records, resolve_media
from neva_tools.errors import NevaError
from neva_tools.inference.batch import Request, generate_batch
from neva_tools.inference.generate import Generation, Sampling, generate
from neva_tools.inference.load import LoadedNeva, load_image_batch
from neva_tools.inference.prompt import generation_prompt, stop_token_ids, user_message
from neva_tools.utils.atomic import ANSWERS, atomic_path, check_output_path
from neva_tools.utils.log import global_rank, progress

PROMPT_KEYS = ("id", "prompt", "image", "images", "system")


def prompt_request(loaded: LoadedNeva, prompt: str, images: Sequence[str | Path] = (), *, system: str | None = None,
                   where: str = "prompt", seed: int | None = None) -> Request:  # fmt: skip
    """``prompt`` about ``images`` rendered with the model's template, images processed as in training (AnyRes
    tiles), as a :class:`~neva_tools.inference.batch.Request`."""
    turns = [Turn("user", user_message(prompt, len(images), where))]
    ids = generation_prompt(turns, loaded.template, loaded.tokenizer, where=where, system=system,
                            im_start_end=loaded.im_start_end).input_ids  # fmt: skip
    return Request(ids, load_image_batch(list(images), loaded.image_processor), seed=seed, where=where)


def answer(loaded: LoadedNeva, prompt: str, images: Sequence[str | Path] = (), *, system: str | None = None,
           max_new_tokens: int = 256, sampling: Sampling | None = None,
           where: str = "prompt") -> Generation:  # fmt: skip
    """The model's answer to ``prompt`` about ``images``, rendered with its template; stops at the end of turn."""
    request = prompt_request(loaded, prompt, images, system=system, where=where)
    stops = stop_token_ids(loaded.template, loaded.tokenizer)
    return generate(loaded.model, loaded.tokenizer, request.input_ids, request.images, max_new_tokens=max_new_tokens,
                    sampling=sampling, stop_ids=stops, vocab_size=loaded.vocab_size)  # fmt: skip


def read_prompts(path: str | Path) -> list[Record]:
    """The prompt records of a batch file; unparsable lines, unknown keys or a missing prompt raise ``NevaError``."""
    records, problems = [], []
    for item in iter_records(path):
        if not isinstance(item, Record):
            problems.append(f"{item.where()}: {item.message} {item.found}")
            continue
        unknown = sorted(set(item.raw) - set(PROMPT_KEYS))
        if unknown:
            problems.append(f"{item.where()}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(PROMPT_KEYS)})")
        if not isinstance(item.raw.get("prompt"), str):
            problems.append(f"{item.where()}: 'prompt' must be a string, found {item.raw.get('prompt')!r}")
        if not isinstance(item.raw.get("system", ""), str):
            problems.append(f"{item.where()}: 'system' must be a string, found {item.raw['system']!r}")
        image, images = item.raw.get("image", ""), item.raw.get("images", [])
        if not isinstance(image, str) or not (isinstance(images, list) and all(isinstance(p, str) for p in images)):
            problems.append(f"{item.where()}: 'image' must be a path and 'images' a list of paths, found "
                            f"{image!r} / {images!r}")  # fmt: skip
        elif image and images:
            problems.append(f"{item.where()}: give 'image' or 'images', not both")
        records.append(item)
    if problems:
        raise NevaError(f"{len(problems)} problem(s) in {path}:\n  " + "\n  ".join(problems[:20]))
    if not records:
        raise NevaError(f"{path} holds no prompts")
    return records


def answer_file(loaded: LoadedNeva, path: str | Path, output: str | Path, *, image_folder: str | Path | None = None,
                max_new_tokens: int = 256, sampling: Sampling | None = None, overwrite: bool = False,
                batch_size: int = 16) -> list[dict[str, Any]]:  # fmt: skip
    """Answer every prompt of the batch file ``path``, ``batch_size`` per forward pass
    (:func:`~neva_tools.inference.batch.generate_batch`: the answers of one at a time, every line sampled with
    ``sampling.seed`` as :func:`answer` samples it); rank 0 writes ``output`` (JSONL). Returns the rows."""
    records = read_prompts(path)
    if global_rank() == 0:
        check_output_path(Path(output), overwrite, ANSWERS)
    seed = (sampling or Sampling()).seed
    stops = stop_token_ids(loaded.template, loaded.tokenizer)
    rows = []
    chunk = 4 * batch_size  # prompts whose images are held at once; sorted by length inside
    with progress(total=len(records), desc="prompts", unit="prompt") as bar:
        for start in range(0, len(records), chunk):
            part = records[start : start + chunk]
            requests = [prompt_request(loaded, r.raw["prompt"], [resolve_media(p, image_folder) for p in r.images],
                                       system=r.raw.get("system"), where=r.where(), seed=seed)
                        for r in part]  # fmt: skip
            outs = generate_batch(loaded.model, loaded.tokenizer, requests, batch_size=batch_size,
                                  max_new_tokens=max_new_tokens, sampling=sampling, stop_ids=stops,
                                  vocab_size=loaded.vocab_size, on_result=lambda i, g: bar.update(1))  # fmt: skip
            rows.extend({"id": record.id, "prompt": record.raw["prompt"], "answer": out.text, "stop": out.stop,
                         "new_tokens": len(out.tokens)} for record, out in zip(part, outs, strict=True))  # fmt: skip
    if global_rank() == 0:
        with atomic_path(output, kind=ANSWERS, overwrite=overwrite) as tmp:
            tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return rows
