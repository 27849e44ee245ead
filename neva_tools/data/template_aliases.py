"""Other projects' conversation-template names (LLaVA's ``--version``, LLaVA-NeXT's, NeMo's ``model_type``) → ours.

An alias renders exactly what the other project renders: one of our templates as is (``llava_v1`` is our
``vicuna_v1``), or one of ours with the fields that differ changed (LLaVA's ``v1`` says "curious user" where
``llava_v1`` says "curious human"; ``mistral_instruct`` puts LLaMA-2's spaces around each answer; ``chatml_direct``
writes no newline after ``<|im_end|>``). A name whose format no template here renders is refused, naming the
closest template and the difference. Checked against ``conv_templates`` in LLaVA's and LLaVA-NeXT's
``llava/conversation.py`` (``get_prompt`` of each separator style) and NeMo NeVA's ``conversation.py``.

LLaVA's own ``vicuna_v1`` and ``llama_2`` differ from ours of the same name (their default system prompts):
our names win here; ``scripts/llava_train.py`` maps LLaVA's ``--version`` values itself.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from functools import cache
from typing import Any

from neva_tools.errors import NevaError

logger = logging.getLogger(__name__)

_USER_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
#: LLaVA's SeparatorStyle.MPT with ChatML roles: no newline between messages, the system block always present.
_MPT = (
    ("system", "<|im_start|>system\n{system}<|im_end|>"),
    ("user", "<|im_start|>user\n{q}<|im_end|><|im_start|>assistant\n"),
    ("after_end", ""),
)
_DIRECT = (*_MPT, ("default_system", "Answer the questions."))
_DIRECT_WHAT = "in MPT style (no newline after <|im_end|>) with the system prompt 'Answer the questions.'"
#: LLaVA's SeparatorStyle.LLAMA_2 with an empty system prompt and no BOS between rounds (conv_mistral_instruct).
_LLAMA_2_STYLE = (("answer", " {a} "), ("system", "<<SYS>>\n{system}\n<</SYS>>\n\n"))
_LLAMA_2_WHAT = "in LLaMA-2 style: '[/INST] {a} </s>' (a space before and after each answer)"


@dataclass(frozen=True)
class Alias:
    """Another project's name for ``target``; ``changes`` are the ``Template`` fields that differ, ``what`` says how."""

    target: str
    source: str
    changes: tuple[tuple[str, Any], ...] = ()
    what: str = ""


ALIASES: dict[str, Alias] = {
    "v1": Alias("vicuna_v1", "LLaVA's and NeMo's", (("default_system", _USER_SYSTEM),),
                "with their default system prompt 'A chat between a curious user ...' (ours: 'curious human')"),
    "llava_v1": Alias("vicuna_v1", "LLaVA's"),
    "llava_llama_2": Alias("llama_2", "LLaVA's"),
    "llava_llama_2_simple": Alias(
        "llama_2", "LLaVA's",
        (("default_system", "Answer the questions about the visual content that the user provides."),),
        "with the system prompt 'Answer the questions about the visual content that the user provides.'"),
    "mistral_instruct": Alias("mistral", "LLaVA's", _LLAMA_2_STYLE, _LLAMA_2_WHAT),
    "llava_mistral_instruct": Alias("mistral", "LLaVA-NeXT's", _LLAMA_2_STYLE, _LLAMA_2_WHAT),
    "qwen_1_5": Alias("chatml", "LLaVA-NeXT's"),
    "qwen_2": Alias("chatml", "LLaVA-NeXT's"),
    "chatml_direct": Alias("chatml", "LLaVA's", _DIRECT, _DIRECT_WHAT),
    "mistral_direct": Alias("chatml", "LLaVA's", _DIRECT, _DIRECT_WHAT),
    "mpt": Alias("chatml", "LLaVA's", (*_MPT, ("default_system", "A conversation between a user and an LLM-based AI "
                                               "assistant. The assistant gives helpful and honest answers.")),
                 "in MPT style (no newline after <|im_end|>) with LLaVA's MPT system prompt"),
    "llava_llama_3": Alias("llama_3", "LLaVA-NeXT's"),
    "v0_plain": Alias("plain", "LLaVA's"),
}  # fmt: skip

#: Other projects' names no template here renders: name → (closest template or None, the difference).
UNMATCHED: dict[str, tuple[str | None, str]] = {
    **dict.fromkeys(("default", "v0", "llava_v0"), ("vicuna_v1", "LLaVA's v0 uses '###' separators and "
                                                    "'Human:'/'Assistant:' roles")),
    **dict.fromkeys(("v0_mmtag", "llava_v0_mmtag", "v1_mmtag", "llava_v1_mmtag"),
                    ("vicuna_v1", "the mmtag variants wrap images in <Image>...</Image> after a different system "
                                  "prompt")),
    "llava_llama_2_mmtag": ("llama_2", "the mmtag variant wraps images in <Image>...</Image>"),
    "mistral_zephyr": ("chatml", "Zephyr's <|system|>/<|user|>/<|assistant|> tokens end turns with </s>"),
    "mistral_orca": ("chatml", "MistralOrca's MPT format (see chatml_direct) has its own system prompt"),
    "gemma_instruct": (None, "Gemma's <start_of_turn>user/model turns"),
    **dict.fromkeys(("nvgpt", "nv_steerlm", "nv_dpo"), (None, "NeMo's NVGPT <extra_id_0>System / <extra_id_1> turns")),
}  # fmt: skip

_announced: set[str] = set()


def alias_template(name: str, templates: dict[str, Any]) -> Any | None:
    """The template another project calls ``name`` (None if it is no alias); logged once per name.

    Raises ``NevaError`` for a known name that no template here renders, naming the closest one.
    """
    if name in UNMATCHED:
        closest, why = UNMATCHED[name]
        hint = f"; the closest here is {closest}, which differs: {why}" if closest else f" ({why})"
        raise NevaError(f"conversation template {name!r} renders a format no template here matches{hint}; choose "
                        f"one of {', '.join(templates)} and convert the data or model accordingly")  # fmt: skip
    alias = ALIASES.get(name)
    if alias is None:
        return None
    template = _variant(name, templates[alias.target])
    if name not in _announced:
        _announced.add(name)
        what = f" {alias.what}" if alias.what else ""
        logger.info("conversation template %s is %s name for our %s%s", name, alias.source, alias.target, what)
    return template


@cache
def _variant(name: str, target: Any) -> Any:
    changes = dict(ALIASES[name].changes)
    if not changes:
        return target  # the same rendering: the template keeps our name
    doc = f"{ALIASES[name].source} {name}: our {target.name} {ALIASES[name].what}."
    return dataclasses.replace(target, name=name, doc=doc, **changes)


def accepted_names() -> str:
    """The aliases, for error messages."""
    return ", ".join(ALIASES)
