"""Asking a benchmark's questions in batches with :func:`neva_tools.inference.batch.generate_batch`, resumably.

Each question is one user turn (its text, its images first as LLaVA places them) rendered with the model's
template; the answers of a batch go to the :class:`~neva_tools.evalsets.resume.AnswerLog` before the next batch is
built, and questions already in the log are skipped. Images are decoded one batch at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from neva_tools.data.records import Turn
from neva_tools.evalsets.resume import AnswerLog
from neva_tools.inference.batch import Request, generate_batch
from neva_tools.inference.generate import Generation
from neva_tools.inference.load import LoadedNeva, load_image_batch
from neva_tools.inference.prompt import generation_prompt, stop_token_ids, user_message
from neva_tools.utils.log import progress


@dataclass(frozen=True)
class Item:
    """One question: its key in the answer log, the user's text and a function giving its images."""

    key: Hashable
    text: str
    images: Callable[[], list[Image.Image | str | Path]]
    where: str  # for messages: file and line


def request(loaded: LoadedNeva, item: Item) -> Request:
    """The prompt ids (the model's template, ``<image>\\n`` before the text) and processed images of ``item``."""
    images = item.images()
    turns = [Turn("user", user_message(item.text, len(images), item.where))]
    ids = generation_prompt(turns, loaded.template, loaded.tokenizer, where=item.where,
                            im_start_end=loaded.im_start_end).input_ids  # fmt: skip
    return Request(list(ids), load_image_batch(images, loaded.image_processor), where=item.where)


def answer_items(loaded: LoadedNeva, items: Sequence[Item], log: AnswerLog,
                 row: Callable[[Item, Generation], dict[str, Any]], *, batch_size: int, max_new_tokens: int,
                 desc: str = "questions") -> int:  # fmt: skip
    """Answer the ``items`` not yet in ``log`` (greedy), appending ``row(item, generation)`` per batch; returns how
    many were asked."""
    todo = [item for item in items if item.key not in log.done]
    stops = stop_token_ids(loaded.template, loaded.tokenizer)
    with progress(total=len(todo), desc=desc, unit="q") as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            outs = generate_batch(loaded.model, loaded.tokenizer, [request(loaded, item) for item in chunk],
                                  batch_size=batch_size, max_new_tokens=max_new_tokens, stop_ids=stops,
                                  vocab_size=loaded.vocab_size)  # fmt: skip
            log.append(row(item, out) for item, out in zip(chunk, outs, strict=True))
            bar.update(len(chunk))
    return len(todo)


def barrier() -> None:
    """Wait for every rank (after each has read the answer log, before rank 0 appends to it)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
