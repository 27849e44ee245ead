"""Prompts for generation and scoring, rendered with the same conversation templates as training.

A generation prompt is the conversation up to where the assistant's answer starts; its ids are the training
ids of that prefix exactly (templates encode segment by segment, so the answer never changes them). The stop
tokens are the template's end-of-turn token and the tokenizer's EOS.
"""

from __future__ import annotations

from collections.abc import Sequence

from neva_tools.data.records import IMAGE_PLACEHOLDER, Turn
from neva_tools.data.templates import EOS, IGNORE_INDEX, Tokenized, get_template, tokenize_conversation
from neva_tools.errors import NevaError
from neva_tools.tokenizer.text import TextTokenizer


def user_message(prompt: str, num_images: int, where: str = "prompt") -> str:
    """``prompt`` with one ``<image>`` per image: as written, or ``<image>\\n`` prepended when it has none."""
    found = prompt.count(IMAGE_PLACEHOLDER)
    if found == 0:
        return (IMAGE_PLACEHOLDER + "\n") * num_images + prompt  # LLaVA's placement
    if found != num_images:
        raise NevaError(f"{where} has {found} {IMAGE_PLACEHOLDER} placeholder(s) but {num_images} image(s) were given; "
                        f"write one {IMAGE_PLACEHOLDER} per image or none (then they go first)")  # fmt: skip
    return prompt


def answer_span(tokenized: Tokenized) -> tuple[int, int]:
    """(start, end) of the last answer in ``tokenized.input_ids``: its last supervised run (answer + end token)."""
    labels = tokenized.labels
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    if end == 0:
        raise NevaError("the conversation has no supervised answer tokens")
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start, end


def generation_prompt(
    turns: Sequence[Turn],
    template: str,
    tokenizer: TextTokenizer,
    *,
    where: str = "prompt",
    system: str | None = None,
    im_start_end: bool | tuple[str, str] = False,
) -> Tokenized:
    """Token ids of ``turns`` (ending with a user turn) up to where the assistant's answer starts.

    ``im_start_end``: images between ``<extra_id_4>`` and ``<extra_id_5>`` (true) or the two tokens given, as a
    model trained with ``mm_cfg.use_im_start_end`` and ``im_start_end_tokens`` saw them (``LoadedNeva.im_start_end``).
    """
    if not turns or turns[-1].role != "user":
        raise NevaError(f"{where}: a generation prompt must end with a user turn")
    full = tokenize_conversation([*turns, Turn("assistant", "")], template, tokenizer, where=where, system=system,
                                 im_start_end=im_start_end)  # fmt: skip
    start, _ = answer_span(full)
    return Tokenized(full.input_ids[:start], full.labels[:start], full.num_images)


def stop_token_ids(template: str, tokenizer: TextTokenizer) -> tuple[int, ...]:
    """The template's end-of-turn token id and the tokenizer's EOS id (each once)."""
    end = get_template(template).end
    ids = [tokenizer.eos_id if end == EOS else tokenizer.token_id(end), tokenizer.eos_id]
    return tuple(dict.fromkeys(i for i in ids if i is not None))
