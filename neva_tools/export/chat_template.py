"""Our conversation templates (``neva_tools.data.templates``) as Hugging Face Jinja chat templates.

The Jinja text is generated from the template's own format strings, so both render the same text (see
:func:`chat_template` for the one space added for sentencepiece tokenizers, so that token ids match too): ``<s>`` and
``</s>`` become the tokenizer's ``bos_token`` / ``eos_token`` (left out when it has none), literal text is emitted
as Jinja string literals (exact whitespace, whatever the renderer's ``trim_blocks``), and the fields are filled
from the messages:

* a leading ``system`` message replaces the template's default system prompt (an empty one drops the block);
* ``content`` is a string (``<image>`` placeholders as in our data) or a list of parts: ``{"type": "image"}``
  renders ``<image>\\n`` (LLaVA's placement), ``{"type": "video"}`` ``<video>\\n`` (LLaVA-OneVision's),
  ``{"type": "text", "text": ...}`` its text;
* the part of the user format after ``{q}`` (e.g. `` ASSISTANT:``) is emitted when an assistant message follows
  or, after the last message, with ``add_generation_prompt=True``; an assistant message renders the answer
  format and the end-of-turn token;
* ``plain`` (pretraining) keeps only the images of a user message, as our tokenizer does;
* with ``im_start_end`` (NeMo's ``mm_cfg.use_im_start_end``) every ``<image>`` is rendered between ``<extra_id_4>``
  and ``<extra_id_5>`` (or the two tokens given, ``mm_cfg.im_start_end_tokens``), the ids our tokenizer puts around
  the image.
"""

from __future__ import annotations

import re

from neva_tools.data.records import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from neva_tools.data.templates import BOS, EOS, Template, get_template, wrap_tokens

_FIELDS = re.compile(r"(\{system\}|\{q\}|\{a\}|" + re.escape(BOS) + "|" + re.escape(EOS) + ")")


def _literal(text: str) -> str:
    """A Jinja string literal for ``text``."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r")
    return f"'{escaped}'"


def _emit(fmt: str, fields: dict[str, str] | None = None) -> str:
    """Jinja code that outputs format string ``fmt``; ``fields`` maps ``{q}`` etc. to Jinja code emitting them."""
    out = []
    for part in _FIELDS.split(fmt):
        if part == BOS:
            out.append("{{- bos_token if bos_token else '' -}}")
        elif part == EOS:
            out.append("{{- eos_token -}}")
        elif part in ("{system}", "{q}", "{a}"):
            if part not in (fields or {}):
                raise ValueError(f"field {part} is not allowed in {fmt!r}")
            out.append((fields or {})[part])
        elif part:
            out.append("{{- " + _literal(part) + " -}}")
    return "".join(out)


def _split(fmt: str, field: str) -> tuple[str, str]:
    before, sep, after = fmt.partition(field)
    if not sep:
        raise ValueError(f"format {fmt!r} has no {field}")
    return before, after


_IMAGE = _literal(IMAGE_PLACEHOLDER)
_VIDEO = _literal(VIDEO_PLACEHOLDER)


def _content_macro(im_start_end: bool | tuple[str, str] = False) -> str:
    """The Jinja macro rendering a message's content; images wrapped in the start/end tokens with ``im_start_end``."""
    tokens = wrap_tokens(im_start_end)
    image = _literal(tokens[0] + IMAGE_PLACEHOLDER + tokens[1]) if tokens else _IMAGE
    video = _literal(tokens[0] + VIDEO_PLACEHOLDER + tokens[1]) if tokens else _VIDEO
    text = f"content.replace({_IMAGE}, {image}).replace({_VIDEO}, {video})" if tokens else "content"
    return (
        "{%- macro render(content, keep_text) -%}"
        "{%- if content is string -%}"
        f"{{%- if keep_text -%}}{{{{- {text} -}}}}{{%- else -%}}"
        f"{{{{- {image} * content.count({_IMAGE}) + {video} * content.count({_VIDEO}) -}}}}{{%- endif -%}}"
        "{%- else -%}{%- for part in content -%}"
        f"{{%- if part['type'] in ('image', 'video') -%}}"
        f"{{{{- {image} if part['type'] == 'image' else {video} -}}}}"
        "{%- if keep_text -%}{{- '\\n' -}}{%- endif -%}"
        "{%- elif part['type'] == 'text' and keep_text -%}{{- part['text'] -}}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{%- endmacro -%}"
    )


_CONTENT_MACRO = _content_macro()


def chat_template(template: str | Template, *, word_start_answers: bool = False,
                  im_start_end: bool | tuple[str, str] = False) -> str:  # fmt: skip
    """The Jinja chat template that renders conversations as ``template`` does.

    ``word_start_answers`` is for tokenizers that mark word starts (sentencepiece's dummy prefix): we encode an
    answer as its own segment, so its first word always carries the word-start mark, also right after text
    without a space (mistral's ``[/INST]``, the newline after chatml's or LLaMA-3's assistant header). Whole-string
    tokenization gives that mark only after a space, so one is rendered there. Byte-level tokenizers need none.
    ``im_start_end``: images between ``<extra_id_4>`` and ``<extra_id_5>`` (NeMo's ``use_im_start_end``), or the two
    tokens given (``im_start_end_tokens``).
    """
    tpl = template if isinstance(template, Template) else get_template(template)
    keep = "true" if tpl.user_text else "false"
    user_before, user_after = _split(tpl.user, "{q}")
    answer_before, answer_after = _split(tpl.answer, "{a}")
    before = user_after + answer_before
    ends_special = before.endswith((BOS, EOS, *tpl.specials))
    if word_start_answers and before and not before.endswith(" ") and not ends_special:
        answer_before = " " + answer_before
    parts = [
        f"{{#- NeVA conversation template {tpl.name!r} (neva_tools.data.templates), generated by neva export -#}}",
        _content_macro(im_start_end),
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        "{%- set system = render(messages[0]['content'], true) -%}{%- set turns = messages[1:] -%}",
        "{%- else -%}",
        "{%- set system = " + _literal(tpl.default_system or "") + " -%}{%- set turns = messages -%}",
        "{%- endif -%}",
        _emit(tpl.prefix),
    ]
    system_block = _emit(tpl.system, {"{system}": "{{- system -}}"}) if tpl.system else ""
    if system_block and not tpl.system_in_first_user:
        parts.append("{%- if system -%}" + system_block + "{%- endif -%}")
    first_user_system = ""
    if system_block and tpl.system_in_first_user:
        first_user_system = "{%- if loop.first and system -%}" + system_block + "{%- endif -%}"
    parts += [
        "{%- for message in turns -%}",
        "{%- if message['role'] == 'user' -%}",
        _emit(user_before),
        first_user_system,
        "{{- render(message['content'], " + keep + ") -}}",
        "{%- if (not loop.last and loop.nextitem['role'] == 'assistant') or (loop.last and add_generation_prompt) -%}",
        _emit(user_after),
        "{%- endif -%}",
        "{%- elif message['role'] == 'assistant' -%}",
        _emit(answer_before),
        "{{- render(message['content'], true) -}}",
        _emit(answer_after),
        _emit(tpl.end),
        _emit(tpl.after_end),
        "{%- else -%}",
        "{{- raise_exception('NeVA template " + tpl.name + ": roles must be user/assistant after an optional system "
        "message, found ' + message['role']) -}}",
        "{%- endif -%}",
        "{%- endfor -%}",
    ]
    return "\n".join(p for p in parts if p) + "\n"
