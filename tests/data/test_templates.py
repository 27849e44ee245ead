"""Conversation templates: golden ids and label masks per template, spacing rule, errors.

Expected ids are built here independently: each literal segment of the format is encoded with the raw
tokenizer (sentencepiece / ``transformers`` directly) and the segments are concatenated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import sentencepiece as spm
from builders import byte_level_tokenizer, llama_normalized, with_chat_tokens

from neva_tools.data.records import Turn
from neva_tools.data.templates import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    TEMPLATE_NAMES,
    get_template,
    marks_word_starts,
    render_text,
    required_special_tokens,
    tokenize_conversation,
)
from neva_tools.errors import NevaError
from neva_tools.tokenizer.add_tokens import add_tokens
from neva_tools.tokenizer.text import TextTokenizer

CHAT_TOKENS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>"]
CHAT_TOKENS += ["<|eot_id|>"]
VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAMA_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)
Q1, A1 = "<image>\nWhat colour is the circle?", "The circle is red."
Q2, A2 = "Where is the circle?", "It is in the centre."
CONV = [Turn("user", Q1), Turn("assistant", A1), Turn("user", Q2), Turn("assistant", A2)]

RENDERED = {
    "plain": "<s><image>The circle is red.</s>",
    "vicuna_v1": f"<s>{VICUNA_SYSTEM} USER: <image>\nWhat colour is the circle? ASSISTANT: The circle is red.</s>"
    "USER: Where is the circle? ASSISTANT: It is in the centre.</s>",
    "llama_2": f"<s>[INST] <<SYS>>\n{LLAMA_SYSTEM}\n<</SYS>>\n\n<image>\nWhat colour is the circle? [/INST] "
    "The circle is red. </s><s>[INST] Where is the circle? [/INST] It is in the centre. </s>",
    "mistral": "<s>[INST] <image>\nWhat colour is the circle? [/INST]The circle is red.</s>"
    "[INST] Where is the circle? [/INST]It is in the centre.</s>",
    "chatml": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<image>\nWhat colour is the circle?<|im_end|>\n<|im_start|>assistant\nThe circle is red."
    "<|im_end|>\n<|im_start|>user\nWhere is the circle?<|im_end|>\n<|im_start|>assistant\nIt is in the centre."
    "<|im_end|>\n",
    "llama_3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    f"{LLAMA_SYSTEM}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat colour is the circle?"
    "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nThe circle is red.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhere is the circle?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nIt is in the centre.<|eot_id|>",
}


@dataclass
class Raw:
    """A tokenizer used directly (not through neva_tools): encode, decode, special ids."""

    path: Path
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    special: Callable[[str], int]
    bos: int | None
    eos: int
    sep: str  # the separator space in front of an answer: "" when the tokenizer's "▁" carries it

    def tok(self) -> TextTokenizer:
        return TextTokenizer(self.path)


def _sp_raw(path: Path) -> Raw:
    sp = spm.SentencePieceProcessor(model_file=str(path))
    return Raw(path, sp.encode, sp.decode, sp.piece_to_id, sp.bos_id(), sp.eos_id(), "")


def _hf_raw(path: Path, sep: str) -> Raw:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(path))
    enc = lambda text: hf.encode(text, add_special_tokens=False)  # noqa: E731
    return Raw(path, enc, hf.decode, hf.convert_tokens_to_ids, hf.bos_token_id, hf.eos_token_id, sep)


@pytest.fixture(scope="module")
def sp_chat(sp_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session sentencepiece model (nmt_nfkc: collapses whitespace) plus the chat special tokens."""
    return with_chat_tokens(sp_model, tmp_path_factory.mktemp("tpl") / "chat.model", CHAT_TOKENS)


@pytest.fixture(scope="module")
def sp_llama(sp_chat: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like ``sp_chat`` with LLaMA's normalizer (identity, whitespace kept)."""
    return llama_normalized(sp_chat, tmp_path_factory.mktemp("tpl") / "llama.model")


@pytest.fixture(scope="module")
def byte_level(corpus: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Qwen-like byte-level BPE tokenizer (no BOS, EOS <|endoftext|>) plus the chat special tokens."""
    return byte_level_tokenizer(corpus, tmp_path_factory.mktemp("tpl") / "bl_chat", CHAT_TOKENS)


@pytest.fixture(scope="module")
def hf_chat(hf_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session HF tokenizer (whitespace pre-tokenizer, <s>, </s>) plus the chat special tokens."""
    out = tmp_path_factory.mktemp("tpl") / "hf_chat"
    add_tokens(hf_tokenizer_dir, out, CHAT_TOKENS, "user_defined")
    return out


@pytest.fixture(scope="module", params=["sp", "sp_llama", "byte_level", "hf"])
def raw(request: pytest.FixtureRequest) -> Raw:
    kind = request.param
    if kind.startswith("sp"):
        return _sp_raw(request.getfixturevalue("sp_chat" if kind == "sp" else kind))
    # byte-level BPE keeps the separator space (Ġ); the whitespace pre-tokenizer drops spaces anyway
    return _hf_raw(request.getfixturevalue("byte_level" if kind == "byte_level" else "hf_chat"), " ")


def _expected(raw: Raw, segments: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
    """Concatenate segments: ("t", text) prompt text, ("a", text) answer text, ("s", tok) special, ("e", tok)
    end-of-turn special (supervised), ("i", "") image. ``<s>`` is left out when the tokenizer has no BOS."""
    ids: list[int] = []
    supervised: list[int] = []
    for kind, value in segments:
        if kind == "i":
            new = [IMAGE_TOKEN_INDEX]
        elif kind in ("t", "a"):
            new = raw.encode(value)
        elif value == "<s>":
            new = [] if raw.bos is None else [raw.bos]
        else:
            new = [raw.eos if value == "</s>" else raw.special(value)]
        if kind in ("a", "e"):
            supervised += range(len(ids), len(ids) + len(new))
        ids += new
    return ids, supervised


def _golden(name: str, sep: str) -> list[tuple[str, str]]:
    """Each template's segments for CONV, written out by hand; ``sep`` is the separator before an answer."""
    bot, sh, eh, eot = (
        ("s", "<|begin_of_text|>"),
        ("s", "<|start_header_id|>"),
        ("s", "<|end_header_id|>"),
        ("s", "<|eot_id|>"),
    )
    ims, ime, img = ("s", "<|im_start|>"), ("s", "<|im_end|>"), ("i", "")
    return {
        "plain": [("s", "<s>"), img, ("a", A1), ("e", "</s>")],
        "vicuna_v1": [
            ("s", "<s>"), ("t", VICUNA_SYSTEM + " USER: "), img, ("t", "\nWhat colour is the circle? ASSISTANT:"),
            ("a", sep + A1), ("e", "</s>"),
            ("t", "USER: Where is the circle? ASSISTANT:"), ("a", sep + A2), ("e", "</s>"),
        ],
        "llama_2": [
            ("s", "<s>"), ("t", f"[INST] <<SYS>>\n{LLAMA_SYSTEM}\n<</SYS>>\n\n"), img,
            ("t", "\nWhat colour is the circle? [/INST]"), ("a", sep + A1 + " "), ("e", "</s>"),
            ("s", "<s>"), ("t", "[INST] Where is the circle? [/INST]"), ("a", sep + A2 + " "), ("e", "</s>"),
        ],
        "mistral": [
            ("s", "<s>"), ("t", "[INST] "), img, ("t", "\nWhat colour is the circle? [/INST]"),
            ("a", A1), ("e", "</s>"),
            ("t", "[INST] Where is the circle? [/INST]"), ("a", A2), ("e", "</s>"),
        ],
        "chatml": [
            ims, ("t", "system\nYou are a helpful assistant."), ime, ("t", "\n"),
            ims, ("t", "user\n"), img, ("t", "\nWhat colour is the circle?"), ime, ("t", "\n"),
            ims, ("t", "assistant\n"),
            ("a", A1), ("e", "<|im_end|>"), ("t", "\n"),
            ims, ("t", "user\nWhere is the circle?"), ime, ("t", "\n"), ims, ("t", "assistant\n"),
            ("a", A2), ("e", "<|im_end|>"), ("t", "\n"),
        ],
        "llama_3": [
            bot, sh, ("t", "system"), eh, ("t", "\n\n" + LLAMA_SYSTEM), eot,
            sh, ("t", "user"), eh, ("t", "\n\n"), img, ("t", "\nWhat colour is the circle?"), eot,
            sh, ("t", "assistant"), eh, ("t", "\n\n"), ("a", A1), ("e", "<|eot_id|>"),
            sh, ("t", "user"), eh, ("t", "\n\nWhere is the circle?"), eot,
            sh, ("t", "assistant"), eh, ("t", "\n\n"), ("a", A2), ("e", "<|eot_id|>"),
        ],
    }[name]  # fmt: skip


def _conv(name: str) -> list[Turn]:
    return CONV[:2] if name == "plain" else CONV


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_golden_ids_and_label_mask(name: str, raw: Raw) -> None:
    tok = raw.tok()
    out = tokenize_conversation(_conv(name), name, tok)
    ids, supervised = _expected(raw, _golden(name, raw.sep))
    assert out.input_ids == ids
    assert [i for i, label in enumerate(out.labels) if label != IGNORE_INDEX] == supervised
    assert all(out.labels[i] == ids[i] for i in supervised)
    assert out.num_images == 1 and out.input_ids.count(IMAGE_TOKEN_INDEX) == 1
    end = raw.eos if get_template(name).end == "</s>" else raw.special(get_template(name).end)
    answers = [A1] if name == "plain" else [A1, A2]
    assert [out.input_ids[i] for i in supervised].count(end) == len(answers)
    spoken = raw.decode([out.input_ids[i] for i in supervised if out.input_ids[i] != end])
    assert "".join(spoken.split()) == "".join(answers).replace(" ", "")  # the whitespace tokenizer drops spaces


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_render_text(name: str) -> None:
    assert render_text(_conv(name), name) == RENDERED[name]


def _decoded(raw: Raw, ids: list[int]) -> str:
    """Decode text runs one by one; specials as their pieces (BOS/EOS as <s>/</s>), images as <image>."""
    specials = {raw.special(t): t for t in CHAT_TOKENS} | {raw.eos: "</s>"} | ({raw.bos: "<s>"} if raw.bos else {})
    out, run = [], []
    for i in [*ids, None]:
        if i in specials or i == IMAGE_TOKEN_INDEX or i is None:
            out.append(raw.decode(run) if run else "")
            run = []
            out.append("" if i is None else "<image>" if i == IMAGE_TOKEN_INDEX else specials[i])
        else:
            run.append(i)
    return "".join(out)


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
@pytest.mark.parametrize("kind", ["sp_llama", "byte_level", "sp_chat"])
def test_decoded_ids_give_back_rendered_text(name: str, kind: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(kind)
    raw = _sp_raw(path) if kind.startswith("sp") else _hf_raw(path, " ")
    text = _decoded(raw, tokenize_conversation(_conv(name), name, raw.tok()).input_ids)
    rendered = RENDERED[name] if raw.bos is not None else RENDERED[name].replace("<s>", "")
    if kind == "sp_llama" and name in ("mistral", "chatml", "llama_3"):
        # an answer that follows text without a space ("[/INST]The", "assistant\nThe") is its own segment, so
        # sentencepiece's dummy prefix gives it a "▁" (as Mistral's tokenizer, which encodes messages one by one)
        rendered = rendered.replace(A1, " " + A1).replace(A2, " " + A2)
    if kind == "sp_chat":  # nmt_nfkc turns newlines into spaces and drops whitespace at segment edges
        text, rendered = "".join(text.split()), "".join(rendered.split())
    assert text == rendered


def test_spacing_rule(sp_llama: Path, byte_level: Path, sp_chat: Path, hf_chat: Path) -> None:
    assert marks_word_starts(TextTokenizer(sp_llama)) and marks_word_starts(TextTokenizer(sp_chat))
    assert not marks_word_starts(TextTokenizer(byte_level))
    sp = spm.SentencePieceProcessor(model_file=str(sp_llama))
    # the rule matters: LLaMA-like normalization would add a lone "▁" for the separator space
    assert sp.encode(" " + A1) != sp.encode(A1)
    out = tokenize_conversation(CONV, "vicuna_v1", TextTokenizer(sp_llama))
    answers = [i for i in out.labels if i != IGNORE_INDEX]
    assert answers[: answers.index(sp.eos_id())] == sp.encode(A1)
    # per-segment ids equal whole-string ids across the prompt/answer boundary
    whole = sp.encode("USER: Where is the circle? ASSISTANT: It is in the centre.")
    assert out.input_ids[-len(whole) - 1 : -1] == whole
    # byte-level BPE keeps the space, which merges into the first answer token ("Ġ..."), as in whole-string ids
    bl = _hf_raw(byte_level, " ")
    out = tokenize_conversation(CONV, "vicuna_v1", bl.tok())
    whole = bl.encode("USER: Where is the circle? ASSISTANT: It is in the centre.")
    assert out.input_ids[-len(whole) - 1 : -1] == whole
    # a whitespace pre-tokenizer drops spaces, so dropping the separator changes nothing
    assert marks_word_starts(TextTokenizer(hf_chat))


def test_system_turn_overrides_default_and_argument(sp_chat: Path) -> None:
    raw, tok = _sp_raw(sp_chat), TextTokenizer(sp_chat)
    turns = [Turn("system", "You describe shapes."), *CONV]
    assert render_text(turns, "vicuna_v1").startswith("<s>You describe shapes. USER: <image>")
    assert render_text(turns, "vicuna_v1", system="ignored") == render_text(turns, "vicuna_v1")
    assert render_text(CONV, "mistral", system="Be brief.").startswith("<s>[INST] Be brief.\n\n<image>\nWhat")
    assert render_text(CONV, "chatml", system="").startswith("<|im_start|>user\n<image>")
    assert render_text(CONV, "llama_2", system="").startswith("<s>[INST] <image>\nWhat colour")
    out = tokenize_conversation(turns, "chatml", tok)
    golden = _golden("chatml", "")
    golden[1] = ("t", "system\nYou describe shapes.")
    ids, supervised = _expected(raw, golden)
    assert out.input_ids == ids
    assert [i for i, label in enumerate(out.labels) if label != IGNORE_INDEX] == supervised
    assert tokenize_conversation(CONV, "chatml", tok, system="You describe shapes.").input_ids == ids


def test_plain_drops_user_text(sp_chat: Path) -> None:
    tok = TextTokenizer(sp_chat)
    a = tokenize_conversation([Turn("user", "<image>\nDescribe it."), Turn("assistant", A1)], "plain", tok)
    b = tokenize_conversation([Turn("user", "Look: <image>"), Turn("assistant", A1)], "plain", tok)
    assert a == b
    with pytest.raises(NevaError, match=r"line 3: template 'plain' takes 1 user/assistant round, found 2"):
        tokenize_conversation(CONV, "plain", tok, where="data.jsonl:line 3")


def test_multiple_images_and_expanded_length(byte_level: Path) -> None:
    raw = _hf_raw(byte_level, " ")
    turns = [
        Turn("user", "<image>\n<image>\nWhich is red?"),
        Turn("assistant", "The left one."),
        Turn("user", "And <image>?"),
        Turn("assistant", "Blue."),
    ]
    out = tokenize_conversation(turns, "chatml", raw.tok())
    ims, ime, img = ("s", "<|im_start|>"), ("s", "<|im_end|>"), ("i", "")
    ids, supervised = _expected(
        raw,
        [
            ims, ("t", "system\nYou are a helpful assistant."), ime, ("t", "\n"),
            ims, ("t", "user\n"), img, ("t", "\n"), img, ("t", "\nWhich is red?"), ime, ("t", "\n"),
            ims, ("t", "assistant\n"), ("a", "The left one."), ("e", "<|im_end|>"), ("t", "\n"),
            ims, ("t", "user\nAnd "), img, ("t", "?"), ime, ("t", "\n"), ims, ("t", "assistant\n"),
            ("a", "Blue."), ("e", "<|im_end|>"), ("t", "\n"),
        ],
    )  # fmt: skip
    assert out.input_ids == ids
    assert [i for i, label in enumerate(out.labels) if label != IGNORE_INDEX] == supervised
    assert out.num_images == 3
    assert all(out.labels[i] == IGNORE_INDEX for i, t in enumerate(out.input_ids) if t == IMAGE_TOKEN_INDEX)
    assert out.expanded_length(576) == len(ids) + 3 * 575
    assert out.expanded_length(1) == len(ids)


def test_missing_special_token(sp_model: Path, hf_tokenizer_dir: Path) -> None:
    with pytest.raises(NevaError) as err:
        tokenize_conversation(CONV, "chatml", TextTokenizer(sp_model))
    msg = str(err.value)
    assert "'chatml'" in msg and "<|im_start|>, <|im_end|>" in msg and str(sp_model) in msg
    assert "neva tokenizer add-tokens" in msg and "--tokens <|im_start|> <|im_end|>" in msg
    with pytest.raises(NevaError, match=r"'llama_3' needs the special token\(s\) <\|begin_of_text\|>"):
        tokenize_conversation(CONV, "llama_3", TextTokenizer(hf_tokenizer_dir))
    assert required_special_tokens("chatml") == ["<|im_start|>", "<|im_end|>"]
    assert required_special_tokens(get_template("vicuna_v1")) == []
    assert len(required_special_tokens("llama_3")) == 4


@pytest.mark.parametrize(
    ("turns", "pattern"),
    [
        ([Turn("user", Q1), Turn("assistant", "See <image>")], r"turn 1 \(assistant\) contains <image> in 'See "),
        ([Turn("user", Q1), Turn("user", Q2), Turn("assistant", A1)], r"turn 1 is a 'user' turn where a 'assistant'.*"
         r"roles: user, user, assistant"),
        ([Turn("assistant", A1), Turn("user", Q1)], r"turn 0 is a 'assistant' turn where a 'user'"),
        ([Turn("system", "s"), Turn("user", Q1), Turn("system", "t")], r"turn 2 is a 'system' turn"),
        ([], r"the conversation is empty"),
        ([Turn("system", "s")], r"the conversation has only a system turn"),
        ([*CONV, Turn("user", "And?")], r"the conversation ends with a user turn \('And\?'\)"),
        ([Turn("system", "<image>"), *CONV], r"turn 0 \(system\) contains <image>"),
    ],
)  # fmt: skip
def test_bad_conversations(turns: list[Turn], pattern: str, sp_chat: Path) -> None:
    with pytest.raises(NevaError, match=r"^a\.json:index 7 \(id x\): " + pattern):
        tokenize_conversation(turns, "vicuna_v1", TextTokenizer(sp_chat), where="a.json:index 7 (id x)")


def test_unknown_template() -> None:
    with pytest.raises(NevaError, match=r"unknown conversation template 'vicuna'; choose one of plain, vicuna_v1, "):
        get_template("vicuna")
    assert TEMPLATE_NAMES == ("plain", "vicuna_v1", "llama_2", "mistral", "chatml", "llama_3")


def test_template_specials_are_declared() -> None:
    import re

    for name in TEMPLATE_NAMES:
        t = get_template(name)
        used = set(re.findall(r"<\|[a-z_]+\|>", t.prefix + t.system + t.user + t.answer + t.end + t.after_end))
        assert used == set(t.specials), name
