"""Conversation templates: a conversation becomes token ids and labels, only the answers supervised.

A template is data: format strings holding literal text, special tokens and the fields ``{system}``,
``{q}`` (a user message) and ``{a}`` (an assistant message). In format strings ``<s>`` and ``</s>``
stand for the tokenizer's BOS and EOS, whatever their pieces; BOS is left out when the tokenizer has
none (Qwen), a missing EOS or template special token is an error.

Tokenization builds ids and labels together, piece by piece, so labels cannot be misaligned with ids
(the "tokenization mismatch" of LLaVA issues 661/1166/1710 cannot happen). Special tokens are inserted
by id, never by encoding their text; each ``<image>`` of a user message becomes one
``IMAGE_TOKEN_INDEX`` (the model expands it to the image's embeddings), with ``im_start_end`` (NeMo's
``mm_cfg.use_im_start_end``) between the ids of two tokens: NeMo's ``<extra_id_4>`` and ``<extra_id_5>``, or those of
``mm_cfg.im_start_end_tokens`` (LLaVA-1's ``<im_start>``/``<im_end>``, :func:`image_wrap`). Supervised: the ``answer``
format (the assistant message and the literal text around it) and the ``end`` token; everything else
is ``IGNORE_INDEX``.

Spacing rule. A *segment* is a maximal run of text between special tokens, images and the
prompt/answer boundary; each segment is encoded on its own with ``TextTokenizer.encode``. Separator
spaces are written at the start of the segment they precede (``" {a}"``, never ``"ASSISTANT: "``).
When the tokenizer marks word starts itself (sentencepiece's dummy prefix ``▁``, HF ``Metaspace``),
one leading space of a segment is dropped before encoding, because that ``▁`` already stands for it:
``"ASSISTANT:"`` + ``"a"`` then gives the ids of ``"ASSISTANT: a"`` (a LLaMA tokenizer would otherwise
encode ``" a"`` as ``▁ ▁a``). Byte-level BPE tokenizers (Qwen, LLaMA 3) keep the space (``Ġa``), again
matching whole-string tokenization. With a dummy prefix, a segment that starts without a space (after
``</s>``, an image, ``<|im_start|>``) still gets its ``▁``, as in LLaVA's ``tokenizer_image_token``.
"""

from __future__ import annotations

import re
import shlex
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from neva_tools.data.records import IMAGE_PLACEHOLDER, Turn
from neva_tools.errors import NevaError
from neva_tools.tokenizer.text import TextTokenizer

IMAGE_TOKEN_INDEX = -200  # megatron-core LLaVAModel's image placeholder id; one per image, expanded by the model
IGNORE_INDEX = -100
IM_START_TOKEN, IM_END_TOKEN = "<extra_id_4>", "<extra_id_5>"  # NeMo's DEFAULT_IM_START_TOKEN / DEFAULT_IM_END_TOKEN
NEMO_IM_TOKENS = (IM_START_TOKEN, IM_END_TOKEN)  # model.mm_cfg.im_start_end_tokens' default
LLAVA_IM_TOKENS = ("<im_start>", "<im_end>")  # LLaVA-1's DEFAULT_IM_START_TOKEN / DEFAULT_IM_END_TOKEN
BOS, EOS = "<s>", "</s>"  # in format strings: the tokenizer's BOS / EOS

_LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_LLAVA_LLAMA_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)


@dataclass(frozen=True)
class Template:
    """One conversation format; rendered as ``prefix [system] (user answer end after_end)*``."""

    name: str
    default_system: str | None  # used unless a leading system turn or ``system=`` overrides it
    doc: str  # where the format comes from and what it does
    prefix: str = ""  # once, at the start
    system: str = ""  # the system block, emitted only when the system prompt is non-empty
    system_in_first_user: bool = False  # prepend the system block to the first user message (llama_2, mistral)
    user: str = "{q}"  # one round's prompt, up to where the answer starts
    answer: str = "{a}"  # supervised
    end: str = EOS  # end-of-turn token, supervised
    after_end: str = ""  # not supervised (chatml's newline)
    specials: tuple[str, ...] = ()  # template special tokens the tokenizer must hold (inserted by id)
    user_text: bool = True  # False: a user message is reduced to its <image> placeholders (plain)
    max_rounds: int | None = None


_TEMPLATES = (
    Template(
        "plain",
        None,
        "LLaVA pretraining (conv_llava_plain): image then caption. The user text other than <image> is dropped, as "
        "LLaVA's preprocess_plain does; one user turn and one answer; the system prompt is ignored. The caption and "
        "EOS are supervised (LLaVA ends with '\\n', NeMo NeVA with EOS).",
        prefix=BOS,
        user_text=False,
        max_rounds=1,
    ),
    Template(
        "vicuna_v1",
        _LLAVA_SYSTEM,
        "LLaVA-1.5 conv_vicuna_v1 (SeparatorStyle.TWO, sep ' ', sep2 '</s>'): '{system} USER: {q} ASSISTANT: {a}</s>' "
        "and the next round right after the EOS. ' {a}' and EOS are supervised.",
        prefix=BOS,
        system="{system} ",
        user="USER: {q} ASSISTANT:",
        answer=" {a}",
    ),
    Template(
        "llama_2",
        _LLAVA_LLAMA_SYSTEM,
        "LLaMA-2 chat (LLaVA conv_llava_llama_2, Meta's chat_completion): every round is '<s>[INST] {q} [/INST] {a} "
        "</s>', the system block '<<SYS>>\\n{system}\\n<</SYS>>\\n\\n' opens the first user message. ' {a} ' and EOS "
        "are supervised.",
        system="<<SYS>>\n{system}\n<</SYS>>\n\n",
        system_in_first_user=True,
        user="<s>[INST] {q} [/INST]",
        answer=" {a} ",
    ),
    Template(
        "mistral",
        None,
        "Mistral instruct v0.1 (NeMo NeVA's mistral): '<s>[INST] {q} [/INST]{a}</s>[INST] ...', a system prompt, if "
        "given, opens the first user message followed by a blank line. '{a}' and EOS are supervised.",
        prefix=BOS,
        system="{system}\n\n",
        system_in_first_user=True,
        user="[INST] {q} [/INST]",
    ),
    Template(
        "chatml",
        "You are a helpful assistant.",
        "ChatML as Qwen uses it (LLaVA-NeXT conv_qwen): no BOS; '<|im_start|>{role}\\n{text}<|im_end|>\\n' per "
        "message. '{a}' and <|im_end|> are supervised, the newline after it is not.",
        system="<|im_start|>system\n{system}<|im_end|>\n",
        user="<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n",
        end="<|im_end|>",
        after_end="\n",
        specials=("<|im_start|>", "<|im_end|>"),
    ),
    Template(
        "llama_3",
        _LLAVA_LLAMA_SYSTEM,
        "LLaMA-3 instruct (LLaVA-NeXT conv_llava_llama_3): '<|begin_of_text|>' then per message "
        "'<|start_header_id|>{role}<|end_header_id|>\\n\\n{text}<|eot_id|>'. '{a}' and <|eot_id|> are supervised.",
        prefix="<|begin_of_text|>",
        system="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{q}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        end="<|eot_id|>",
        specials=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
)
TEMPLATES: dict[str, Template] = {t.name: t for t in _TEMPLATES}
TEMPLATE_NAMES: tuple[str, ...] = tuple(TEMPLATES)


def get_template(name: str) -> Template:
    """The template called ``name`` or another project's name for it (``neva_tools.data.template_aliases``: LLaVA's
    ``--version``, NeMo's ``model_type``); an unknown name is a ``NevaError`` listing the known ones."""
    from neva_tools.data.template_aliases import accepted_names, alias_template

    if name in TEMPLATES:
        return TEMPLATES[name]
    aliased = alias_template(str(name), TEMPLATES)
    if aliased is None:
        raise NevaError(f"unknown conversation template {name!r}; choose one of {', '.join(TEMPLATE_NAMES)} (or "
                        f"LLaVA's/NeMo's names for them: {accepted_names()})")  # fmt: skip
    return aliased


def _resolve(template: str | Template) -> Template:
    return template if isinstance(template, Template) else get_template(template)


def required_special_tokens(template: str | Template) -> list[str]:
    """The special tokens the tokenizer must contain (besides EOS), e.g. chatml: <|im_start|>, <|im_end|>."""
    return list(_resolve(template).specials)


@dataclass
class Tokenized:
    """One tokenized conversation: ``labels`` is ``input_ids`` with every unsupervised position ``IGNORE_INDEX``."""

    input_ids: list[int]
    labels: list[int]
    num_images: int

    def expanded_length(self, image_tokens: int | Sequence[int]) -> int:
        """The sequence length once the model replaces each image id by ``image_tokens`` embeddings (one count for
        every image, or each image's count: ``neva_tools.data.anyres.sample_image_tokens``)."""
        if isinstance(image_tokens, int):
            return len(self.input_ids) + self.num_images * (image_tokens - 1)
        if len(image_tokens) != self.num_images:
            raise NevaError(f"{len(image_tokens)} image token counts for {self.num_images} images")
        return len(self.input_ids) + sum(image_tokens) - self.num_images


@dataclass(frozen=True)
class _Piece:
    kind: str  # "text", "special" or "image"
    value: str
    supervised: bool = False


@cache
def _splitter(tpl: Template) -> re.Pattern[str]:
    tokens = ("{system}", "{q}", "{a}", BOS, EOS, *tpl.specials)
    return re.compile("(" + "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)) + ")")


def _expand(fmt: str, tpl: Template, fields: dict[str, list[_Piece]], supervised: bool = False) -> list[_Piece]:
    """The pieces of a format string; fields (``{q}`` ...) are replaced by the given pieces."""
    out: list[_Piece] = []
    for part in _splitter(tpl).split(fmt):
        if part in fields:
            out.extend(fields[part])
        elif part in (BOS, EOS, *tpl.specials):
            out.append(_Piece("special", part, supervised))
        elif part:
            out.append(_Piece("text", part, supervised))
    return out


def _message(text: str, supervised: bool = False, keep_text: bool = True) -> list[_Piece]:
    """A message as text pieces with one image piece per ``<image>``."""
    out: list[_Piece] = []
    for i, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i:
            out.append(_Piece("image", IMAGE_PLACEHOLDER))
        if chunk and keep_text:
            out.append(_Piece("text", chunk, supervised))
    return out


def _snippet(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _rounds(turns: Sequence[Turn], tpl: Template, where: str) -> tuple[str | None, list[tuple[str, str]]]:
    """Check the turn structure; return the system turn's text (or None) and the (user, assistant) rounds."""
    if not turns:
        raise NevaError(f"{where}: the conversation is empty; it needs a user turn followed by an assistant turn")
    system, start = (turns[0].text, 1) if turns[0].role == "system" else (None, 0)
    if system is not None and IMAGE_PLACEHOLDER in system:
        raise NevaError(f"{where}: turn 0 (system) contains {IMAGE_PLACEHOLDER}; images belong in user turns")
    for i in range(start, len(turns)):
        role, expected = turns[i].role, ("user", "assistant")[(i - start) % 2]
        if role != expected:
            found = ", ".join(t.role for t in turns)
            raise NevaError(
                f"{where}: turn {i} is a {role!r} turn where a {expected!r} turn was expected (roles: {found}); "
                "turns must alternate user/assistant after an optional leading system turn"
            )
        if role == "assistant" and IMAGE_PLACEHOLDER in turns[i].text:
            raise NevaError(
                f"{where}: turn {i} (assistant) contains {IMAGE_PLACEHOLDER} in {_snippet(turns[i].text)}; "
                "images belong in user turns — move or remove the placeholder"
            )
    body = turns[start:]
    if not body:
        raise NevaError(f"{where}: the conversation has only a system turn; add a user turn and an assistant turn")
    if len(body) % 2:
        raise NevaError(
            f"{where}: the conversation ends with a user turn ({_snippet(body[-1].text)}) that has no answer to "
            "train on; add the assistant's answer or drop the turn"
        )
    rounds = [(body[i].text, body[i + 1].text) for i in range(0, len(body), 2)]
    if tpl.max_rounds is not None and len(rounds) > tpl.max_rounds:
        raise NevaError(
            f"{where}: template {tpl.name!r} takes {tpl.max_rounds} user/assistant round, found {len(rounds)}; "
            "use an instruction template (e.g. vicuna_v1) for multi-turn data"
        )
    return system, rounds


def _pieces(turns: Sequence[Turn], tpl: Template, system: str | None, where: str) -> list[_Piece]:
    turn_system, rounds = _rounds(turns, tpl, where)
    text = turn_system if turn_system is not None else system if system is not None else tpl.default_system
    if text and IMAGE_PLACEHOLDER in text:
        raise NevaError(f"{where}: the system prompt contains {IMAGE_PLACEHOLDER}; images belong in user turns")
    sys_block = _expand(tpl.system, tpl, {"{system}": [_Piece("text", text)]}) if text and tpl.system else []
    out = _expand(tpl.prefix, tpl, {})
    if not tpl.system_in_first_user:
        out += sys_block
    for i, (q, a) in enumerate(rounds):
        user = _message(q, keep_text=tpl.user_text)
        if i == 0 and tpl.system_in_first_user:
            user = sys_block + user
        out += _expand(tpl.user, tpl, {"{q}": user})
        out += _expand(tpl.answer, tpl, {"{a}": _message(a, supervised=True)}, supervised=True)
        out += _expand(tpl.end, tpl, {}, supervised=True)
        out += _expand(tpl.after_end, tpl, {})
    return out


def render_text(turns: Sequence[Turn], template: str | Template, system: str | None = None) -> str:
    """The conversation as the template lays it out (``<s>``/``</s>`` for BOS/EOS, images as ``<image>``)."""
    return "".join(p.value for p in _pieces(turns, _resolve(template), system, "record"))


_marks_word_starts: weakref.WeakKeyDictionary[TextTokenizer, bool] = weakref.WeakKeyDictionary()


def marks_word_starts(tokenizer: TextTokenizer) -> bool:
    """True when separately encoded texts decode with a space between them (sentencepiece's dummy prefix)."""
    if tokenizer not in _marks_word_starts:
        ids = tokenizer.encode("a") + tokenizer.encode("b")
        _marks_word_starts[tokenizer] = tokenizer.decode(ids).strip() != "ab"
    return _marks_word_starts[tokenizer]


def _special_ids(tpl: Template, tokenizer: TextTokenizer) -> dict[str, int | None]:
    ids: dict[str, int | None] = {BOS: tokenizer.bos_id, EOS: tokenizer.eos_id}
    missing = []
    for token in tpl.specials:
        ids[token] = tokenizer.token_id(token)
        if ids[token] is None:
            missing.append(token)
    if missing:
        raise NevaError(
            f"template {tpl.name!r} needs the special token(s) {', '.join(missing)}, which tokenizer "
            f"{tokenizer.path} lacks; add them with `neva tokenizer add-tokens --input {tokenizer.path} "
            f"--output NEW_TOKENIZER --tokens {' '.join(missing)}` and train with the new tokenizer"
        )
    if ids[EOS] is None and tpl.end == EOS:
        raise NevaError(
            f"template {tpl.name!r} ends turns with EOS but tokenizer {tokenizer.path} defines no EOS token; "
            "use a tokenizer with an EOS or a template with its own end token (chatml, llama_3)"
        )
    return ids


def wrap_tokens(im_start_end: bool | Sequence[str]) -> tuple[str, str] | None:
    """The two tokens around each image for an ``im_start_end`` argument: none (false), NeMo's (true) or the two
    tokens given."""
    if isinstance(im_start_end, bool):
        return NEMO_IM_TOKENS if im_start_end else None
    start, end = im_start_end
    return str(start), str(end)


def image_wrap(mm_cfg: Mapping[str, Any] | None) -> tuple[str, str] | None:
    """The two tokens a model config's ``mm_cfg`` wraps each image in: ``im_start_end_tokens`` (NeMo's when unset) if
    ``use_im_start_end``, else None. A value that is not two distinct tokens is an error naming it."""
    if not mm_cfg or not mm_cfg.get("use_im_start_end"):
        return None
    tokens = mm_cfg.get("im_start_end_tokens")
    if tokens is None:
        return NEMO_IM_TOKENS
    pair = [] if isinstance(tokens, str) else list(tokens)
    if len(pair) != 2 or not all(isinstance(t, str) and t for t in pair) or pair[0] == pair[1]:
        raise NevaError(f"model.mm_cfg.im_start_end_tokens ({tokens}) must be two distinct tokens, the start and the "
                        f"end of an image: [{IM_START_TOKEN}, {IM_END_TOKEN}] (NeMo's) or "
                        f"[{', '.join(LLAVA_IM_TOKENS)}] (LLaVA-1's)")  # fmt: skip
    return pair[0], pair[1]


def add_wrap_tokens_command(tokenizer: str | Path, output: str | Path, tokens: tuple[str, str]) -> str:
    """The ``neva tokenizer add-tokens`` command that adds ``tokens`` (NeMo's: the ``neva`` preset they belong to)."""
    what = "--preset neva" if tuple(tokens) == NEMO_IM_TOKENS else "--tokens " + shlex.join(tokens)
    return f"neva tokenizer add-tokens --input {tokenizer} --output {output} {what}"


def image_wrap_ids(tokenizer: TextTokenizer, tokens: tuple[str, str] = NEMO_IM_TOKENS) -> tuple[int, int]:
    """The ids of the two ``tokens`` around each image (``use_im_start_end``); missing ones are an error."""
    start, end = (tokenizer.token_id(t) for t in tokens)
    if start is None or end is None:
        missing = [token for token, i in zip(tokens, (start, end), strict=True) if i is None]
        raise NevaError(
            f"model.mm_cfg.use_im_start_end wraps every image in {tokens[0]} ... {tokens[1]}, but tokenizer "
            f"{tokenizer.path} lacks {', '.join(missing)}; add them with "
            f"`{add_wrap_tokens_command(tokenizer.path, 'NEW_TOKENIZER', tokens)}` and train with the new tokenizer "
            "(model.tokenizer.model=NEW_TOKENIZER)"
        )
    return start, end


def tokenize_conversation(
    turns: Sequence[Turn],
    template: str | Template,
    tokenizer: TextTokenizer,
    *,
    where: str = "record",
    system: str | None = None,
    im_start_end: bool | tuple[str, str] = False,
) -> Tokenized:
    """Token ids and labels of a conversation; ``where`` names the record in errors.

    The system prompt is the leading system turn if there is one, else ``system``, else the template's
    default; an empty one leaves the system block out. ``im_start_end`` puts each image's id between the ids of
    two tokens (unsupervised, like the image): true, NeMo's ``<extra_id_4>`` and ``<extra_id_5>``
    (``use_im_start_end``); a pair, those two (``im_start_end_tokens``, :func:`image_wrap`).
    """
    tpl = _resolve(template)
    specials = _special_ids(tpl, tokenizer)
    image = [IMAGE_TOKEN_INDEX]
    tokens = wrap_tokens(im_start_end)
    if tokens is not None:
        start, end = image_wrap_ids(tokenizer, tokens)
        image = [start, IMAGE_TOKEN_INDEX, end]
    strip_space = marks_word_starts(tokenizer)
    ids: list[int] = []
    labels: list[int] = []
    images = 0

    def add(new: list[int], supervised: bool) -> None:
        ids.extend(new)
        labels.extend(new if supervised else [IGNORE_INDEX] * len(new))

    pending: list[_Piece] = []

    def flush() -> None:
        if pending:
            text = "".join(p.value for p in pending)
            add(tokenizer.encode(text[1:] if strip_space and text.startswith(" ") else text), pending[0].supervised)
            pending.clear()

    for piece in _pieces(turns, tpl, system, where):
        if piece.kind == "text":
            if pending and pending[0].supervised != piece.supervised:
                flush()
            pending.append(piece)
            continue
        flush()
        if piece.kind == "image":
            add(image, False)
            images += 1
        elif (token_id := specials[piece.value]) is not None:  # a BOS the tokenizer lacks is left out
            add([token_id], piece.supervised)
    flush()
    return Tokenized(ids, labels, images)
