"""The tokenizer of an exported model: a Hugging Face fast tokenizer that encodes exactly like ours.

A sentencepiece model becomes a ``tokenizers`` tokenizer built from its own proto: the BPE or unigram pieces,
merges ordered by piece score, byte fallback, and a normalizer that follows the model's ``normalizer_spec``
(precompiled character map, ``remove_extra_whitespaces``, ``add_dummy_prefix``). transformers' ``LlamaConverter``
assumes LLaMA's identity normalization instead, so it differs on models trained with sentencepiece's default
``nmt_nfkc`` rules. Control pieces (BOS/EOS) become special tokens and user-defined pieces added tokens; both split
the text before normalization, so each run of text between them is normalized on its own, which is exactly how
``neva_tools.data.templates`` encodes a conversation segment by segment. A Hugging Face tokenizer stored in the
``.nemo`` is used as it is. :func:`check_chat_template` proves the equality on a sample conversation.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from neva_tools.data.records import Turn
from neva_tools.data.templates import BOS, IMAGE_TOKEN_INDEX, Template, render_text, tokenize_conversation
from neva_tools.errors import NevaError
from neva_tools.tokenizer.text import TextTokenizer

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"  # the llava-hf placeholder; the processor expands it to one token per image feature
VIDEO_TOKEN = "<video>"  # LLaVA-OneVision's: one token per pooled frame feature, plus the newline
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6  # sentencepiece piece types
_UNIGRAM, _BPE = 1, 2
#: The conversation :func:`check_chat_template` compares (the first round alone for one-round templates).
PROBE = (
    Turn("user", "<image>\nWhat is shown in the image?"),
    Turn("assistant", "A red circle on a white background."),
    Turn("user", "Where is the circle?"),
    Turn("assistant", "It is in the top left corner."),
)


def _normalizer(spec: Any) -> Any:
    """sentencepiece's normalization (charsmap → whitespace clean-up → dummy prefix → ``▁``) as ``tokenizers``."""
    from tokenizers import Regex, normalizers

    steps: list[Any] = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    return normalizers.Sequence(steps)


def sentencepiece_to_fast(model: Path, *, add_bos: bool = True) -> Any:
    """A ``PreTrainedTokenizerFast`` equivalent to the sentencepiece model at ``model`` (see the module docstring).

    With ``add_bos`` (and a BOS piece) encoding with special tokens prepends BOS, as LLaMA's tokenizer does.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, processors
    from tokenizers.models import BPE, Unigram
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    from neva_tools.tokenizer.sentencepiece_model import load_proto

    proto = load_proto(model)
    trainer, spec = proto.trainer_spec, proto.normalizer_spec
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    if trainer.model_type == _BPE:
        vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
        skip = [piece for piece, _, kind in pieces if kind != _NORMAL]
        scores = {piece: score for piece, score, _ in pieces}
        merges = generate_merges(vocab, scores, skip_tokens=skip)
        core = BPE(vocab, merges, unk_token=trainer.unk_piece, fuse_unk=True, byte_fallback=trainer.byte_fallback)
    elif trainer.model_type == _UNIGRAM:
        core = Unigram([(p, s) for p, s, _ in pieces], unk_id=trainer.unk_id, byte_fallback=trainer.byte_fallback)
    else:
        raise NevaError(f"sentencepiece model {model} has model_type {trainer.model_type}; only BPE and unigram "
                        "models can be exported")  # fmt: skip
    tok = Tokenizer(core)
    tok.normalizer = _normalizer(spec)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    tok.add_tokens([AddedToken(piece, special=kind in (_CONTROL, _UNKNOWN), normalized=False)
                    for piece, _, kind in pieces if kind in (_CONTROL, _UNKNOWN, _USER_DEFINED)])  # fmt: skip

    def piece(index: int) -> str | None:
        return pieces[index][0] if 0 <= index < len(pieces) else None

    bos = piece(trainer.bos_id)
    if add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, trainer.bos_id)]
        )

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=piece(trainer.eos_id),
        unk_token=piece(trainer.unk_id),
        pad_token=piece(trainer.pad_id),
        clean_up_tokenization_spaces=False,
    )


def hf_tokenizer(path: Path, template: Template) -> Any:
    """The HF fast tokenizer for our tokenizer at ``path`` (a sentencepiece model or a HF tokenizer directory).

    A converted sentencepiece tokenizer adds BOS on ``add_special_tokens`` only when ``template`` starts with it.
    """
    if path.is_file():
        return sentencepiece_to_fast(path, add_bos=render_text(PROBE[:2], template).startswith(BOS))
    from neva_tools.tokenizer.hf_tokenizer import load_hf_tokenizer

    tok = load_hf_tokenizer(path)
    if not tok.is_fast:
        raise NevaError(f"the Hugging Face tokenizer in {path} is not a fast tokenizer")
    return tok


def ensure_image_token(tok: Any, token: str = IMAGE_TOKEN) -> int:
    """The id of ``token`` (``<image>``; OneVision's ``<video>`` too) in ``tok``, added as a special token at the end
    of the vocabulary when absent."""
    from tokenizers import AddedToken

    vocab = tok.get_vocab()
    if token not in vocab:
        added = AddedToken(token, special=True, normalized=False)
        tok.add_special_tokens({"extra_special_tokens": [added]}, replace_extra_special_tokens=False)
        vocab = tok.get_vocab()
    ids = tok.encode(f"a{token}b", add_special_tokens=False)
    if vocab[token] not in ids:
        raise NevaError(f"the tokenizer holds {token} (id {vocab[token]}) as an ordinary token that does "
                        "not match inside text; use a tokenizer without it or with it as a special token")  # fmt: skip
    return int(vocab[token])


def prompt_ids(tok: Any, text: str) -> list[int]:
    """Token ids of a rendered prompt as ``LlavaProcessor.apply_chat_template`` makes them (BOS added by the
    tokenizer unless the text starts with it)."""
    add = not (tok.bos_token and text.startswith(tok.bos_token))
    return list(tok(text, add_special_tokens=add)["input_ids"])


def check_chat_template(tok: Any, ours: TextTokenizer, template: Template, jinja: str, image_id: int, *,
                        im_start_end: bool | tuple[str, str] = False) -> None:  # fmt: skip
    """Raise unless the HF tokenizer and chat template give our ids for :data:`PROBE` (``<image>`` ↔ -200;
    ``im_start_end``: the images wrapped as the model was trained)."""
    turns = PROBE[: 2 * (template.max_rounds or 2)]
    ours_ids = tokenize_conversation(turns, template, ours, im_start_end=im_start_end).input_ids
    expected = [image_id if i == IMAGE_TOKEN_INDEX else i for i in ours_ids]
    text = tok.apply_chat_template([{"role": t.role, "content": t.text} for t in turns], chat_template=jinja,
                                   tokenize=False)  # fmt: skip
    got = prompt_ids(tok, text)
    if got != expected:
        same = [a == b for a, b in zip(got, expected, strict=False)]
        at = same.index(False) if False in same else len(same)
        raise NevaError(
            f"the exported tokenizer does not reproduce template {template.name!r} with tokenizer {ours.path}: "
            f"ids differ from position {at} (Hugging Face {got[at : at + 8]}, ours {expected[at : at + 8]}) for "
            f"{text!r}; export with the template the model was trained with (--template)"
        )
