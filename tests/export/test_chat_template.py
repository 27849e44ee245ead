"""Exported chat templates and tokenizers give our token ids for every template and tokenizer kind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from builders import byte_level_tokenizer, llama_normalized, with_chat_tokens
from neva_models import expand_images
from PIL import Image

from neva_tools.data.records import Turn
from neva_tools.data.templates import (
    IGNORE_INDEX,
    TEMPLATE_NAMES,
    get_template,
    marks_word_starts,
    render_text,
    tokenize_conversation,
)
from neva_tools.errors import NevaError
from neva_tools.export.chat_template import chat_template
from neva_tools.export.tokenizer import check_chat_template, ensure_image_token, hf_tokenizer, sentencepiece_to_fast
from neva_tools.tokenizer.text import TextTokenizer

CHAT_TOKENS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
               "<|eot_id|>"]  # fmt: skip
CONV = [Turn("user", "<image>\nWhat colour is the circle?"), Turn("assistant", "The circle is red."),
        Turn("user", "Where is the circle?"), Turn("assistant", "It is in the centre.")]  # fmt: skip
TEXTS = ["A red circle in the top left.", "USER: What colour? ASSISTANT:", " hi", "\nWhat?", "a  b", "ü ",
         "Hello\n\nWorld", "  two", "x\n", " ", "", "\n", "日本 語", "  lead and trail  ", "tab\there"]  # fmt: skip


@pytest.fixture(scope="module")
def sp_chat(sp_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session sentencepiece model (nmt_nfkc: collapses whitespace) plus the chat special tokens."""
    return with_chat_tokens(sp_model, tmp_path_factory.mktemp("chat") / "chat.model", CHAT_TOKENS)


@pytest.fixture(scope="module")
def sp_llama(sp_chat: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like ``sp_chat`` with LLaMA's normalizer (identity, whitespace kept)."""
    return llama_normalized(sp_chat, tmp_path_factory.mktemp("chat") / "llama.model")


@pytest.fixture(scope="module")
def byte_level(corpus: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Qwen-like byte-level BPE tokenizer (no BOS, EOS <|endoftext|>) plus the chat special tokens."""
    return byte_level_tokenizer(corpus, tmp_path_factory.mktemp("chat") / "bl_chat", CHAT_TOKENS)


@pytest.mark.parametrize("kind", ["sp_chat", "sp_llama"])
def test_sentencepiece_conversion_encodes_like_sentencepiece(kind: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(kind)
    ours, theirs = TextTokenizer(path), sentencepiece_to_fast(path)
    for text in TEXTS:
        assert theirs.encode(text, add_special_tokens=False) == ours.encode(text), text
        assert theirs.decode(ours.encode(text)) == ours.decode(ours.encode(text)), text
    assert len(theirs) == ours.vocab_size and theirs.bos_token_id == ours.bos_id and theirs.eos_token_id == ours.eos_id
    assert theirs("hi").input_ids[0] == ours.bos_id  # BOS added like LLaMA's tokenizer unless add_bos=False
    assert sentencepiece_to_fast(path, add_bos=False)("hi").input_ids == ours.encode("hi")


def _processor(path: Path, template: str) -> tuple[Any, TextTokenizer, int]:
    from transformers import LlavaImageProcessorPil, LlavaProcessor

    ours, tpl = TextTokenizer(path), get_template(template)
    tok = hf_tokenizer(path, tpl)
    image_id = ensure_image_token(tok)
    jinja = chat_template(tpl, word_start_answers=marks_word_starts(ours))
    check_chat_template(tok, ours, tpl, jinja, image_id)  # what the export runs before writing
    processor = LlavaProcessor(image_processor=LlavaImageProcessorPil(size={"height": 28, "width": 28},
                                                                      crop_size={"height": 28, "width": 28}),
                               tokenizer=tok, patch_size=7, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=jinja)  # fmt: skip
    return processor, ours, image_id


def _messages(turns: list[Turn], image: Image.Image) -> list[dict[str, Any]]:
    out = []
    for turn in turns:
        if turn.text.startswith("<image>\n"):
            parts = [{"type": "image", "image": image}, {"type": "text", "text": turn.text[len("<image>\n") :]}]
            out.append({"role": turn.role, "content": parts})
        else:
            out.append({"role": turn.role, "content": [{"type": "text", "text": turn.text}]})
    return out


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
@pytest.mark.parametrize("kind", ["sp_chat", "sp_llama", "byte_level"])
def test_apply_chat_template_gives_our_ids(name: str, kind: str, request: pytest.FixtureRequest) -> None:
    processor, ours, image_id = _processor(request.getfixturevalue(kind), name)
    turns = CONV[:2] if name == "plain" else CONV
    expected = tokenize_conversation(turns, name, ours)
    image = Image.new("RGB", (30, 20), (200, 20, 20))
    out = processor.apply_chat_template(_messages(turns, image), tokenize=True, return_dict=True)
    assert out["input_ids"][0] == expand_images(expected.input_ids, image_id, 16)
    # the generation prompt is our prompt: every id before the first supervised one
    prompt = processor.apply_chat_template(_messages(turns[:1], image), tokenize=True, add_generation_prompt=True,
                                           return_dict=True)  # fmt: skip
    first = next(i for i, label in enumerate(expected.labels) if label != IGNORE_INDEX)
    assert prompt["input_ids"][0] == expand_images(expected.input_ids[:first], image_id, 16)


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_rendered_text_is_ours(name: str) -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    for system in (None, "Be brief.", ""):
        turns = ([Turn("system", system)] if system is not None else []) + (CONV[:2] if name == "plain" else CONV)
        messages = [{"role": t.role, "content": t.text} for t in turns]
        text, _ = render_jinja_template(conversations=[messages], chat_template=chat_template(name), bos_token="<s>",
                                        eos_token="</s>")  # fmt: skip
        assert text[0] == render_text(turns, name)


def test_wrong_template_is_refused(sp_llama: Path) -> None:
    ours = TextTokenizer(sp_llama)
    tok = hf_tokenizer(sp_llama, get_template("vicuna_v1"))
    image_id = ensure_image_token(tok)
    with pytest.raises(NevaError, match=r"does not reproduce template 'llama_2'.*ids differ from position"):
        check_chat_template(tok, ours, get_template("llama_2"), chat_template("vicuna_v1"), image_id)
