"""Other projects' template names: an alias renders (and tokenizes) exactly like its target, or like the other
project's ``get_prompt`` where a field differs (golden strings written from LLaVA's conversation.py); names no
template renders are refused naming the closest; each alias is logged once; validation accepts them."""

from __future__ import annotations

import logging

import pytest

from neva_tools.data.records import Turn
from neva_tools.data.template_aliases import ALIASES, UNMATCHED
from neva_tools.data.templates import get_template, render_text, tokenize_conversation
from neva_tools.errors import NevaError
from neva_tools.tokenizer.text import TextTokenizer

CONV = [Turn("user", "<image>\nQ1"), Turn("assistant", "A1"), Turn("user", "Q2"), Turn("assistant", "A2")]
EXACT = {name: a.target for name, a in ALIASES.items() if not a.changes}
USER = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions.")  # fmt: skip
#: What LLaVA's get_prompt renders (BOS as <s>, added by LLaVA's tokenizer) for the aliases whose fields differ.
GOLDEN = {
    "v1": f"<s>{USER} USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>",
    "mistral_instruct": "<s>[INST] <image>\nQ1 [/INST] A1 </s>[INST] Q2 [/INST] A2 </s>",
    "chatml_direct": "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nQ1<|im_end|>"
    "<|im_start|>assistant\nA1<|im_end|><|im_start|>user\nQ2<|im_end|><|im_start|>assistant\nA2<|im_end|>",
    "llava_llama_2_simple": "<s>[INST] <<SYS>>\nAnswer the questions about the visual content that the user "
    "provides.\n<</SYS>>\n\n<image>\nQ1 [/INST] A1 </s><s>[INST] Q2 [/INST] A2 </s>",
}


@pytest.mark.parametrize("name", sorted(EXACT))
def test_exact_aliases_render_like_their_target(name: str) -> None:
    turns = CONV[:2] if EXACT[name] == "plain" else CONV
    assert get_template(name) is get_template(EXACT[name])
    assert render_text(turns, name) == render_text(turns, EXACT[name])


def test_exact_alias_tokenizes_like_its_target(sp_model: object) -> None:
    tok = TextTokenizer(sp_model)
    alias, target = (tokenize_conversation(CONV, n, tok) for n in ("llava_v1", "vicuna_v1"))
    assert (alias.input_ids, alias.labels) == (target.input_ids, target.labels)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_variants_render_what_llava_renders(name: str) -> None:
    assert render_text(CONV, name) == GOLDEN[name]
    assert get_template(name).name == name  # a variant keeps the other project's name (export, inference)
    assert render_text(CONV, name) != render_text(CONV, ALIASES[name].target)


def test_unrenderable_names_are_refused_naming_the_closest() -> None:
    with pytest.raises(NevaError, match=r"'llava_v0' renders a format no template here matches; the closest here is "
                                        r"vicuna_v1, which differs: LLaVA's v0 uses '###'"):  # fmt: skip
        get_template("llava_v0")
    for name in UNMATCHED:
        with pytest.raises(NevaError, match="no template here matches"):
            get_template(name)
    with pytest.raises(NevaError, match=r"unknown conversation template 'vicuna'.*LLaVA's/NeMo's names.*qwen_1_5"):
        get_template("vicuna")


def test_each_alias_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    from neva_tools.data import template_aliases

    template_aliases._announced.discard("qwen_2")
    with caplog.at_level(logging.INFO, logger="neva_tools.data.template_aliases"):
        for _ in range(3):
            get_template("qwen_2")
    lines = [r.getMessage() for r in caplog.records if "qwen_2" in r.getMessage()]
    assert lines == ["conversation template qwen_2 is LLaVA-NeXT's name for our chatml"]


def test_config_validation_accepts_aliases_and_names_refusals() -> None:
    from neva_tools.config.load import load_config
    from neva_tools.train.validate import check_config

    assert check_config(load_config(None, ["model.mm_cfg.llm.model_type=qwen_1_5"])) == []
    assert check_config(load_config(None, ["model.data.conv_template=llava_llama_3"])) == []
    problems = check_config(load_config(None, ["model.mm_cfg.llm.model_type=gemma_instruct"]))
    assert any(p.startswith("model.data.conv_template: conversation template 'gemma_instruct'") for p in problems)
