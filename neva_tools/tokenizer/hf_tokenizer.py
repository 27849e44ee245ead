"""Adding special tokens to a Hugging Face tokenizer directory (``tokenizer.json`` / ``tokenizer_config.json``)."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from neva_tools.errors import NevaError
from neva_tools.tokenizer.tokens import TokenResult
from neva_tools.utils.atomic import HF_TOKENIZER_DIR, atomic_path, make_temp, remove_stale_temporaries

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_hf_tokenizer(path: Path) -> Any:
    """Load a local Hugging Face tokenizer directory without running remote code."""
    from transformers import AutoTokenizer

    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise NevaError(
            f"{path} holds no Hugging Face tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
            "pass a sentencepiece .model file or a directory saved with save_pretrained"
        )
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise NevaError(f"could not load the Hugging Face tokenizer in {path}: {exc}") from None


def _plan(tok: Any, tokens: Sequence[str]) -> tuple[list[str], dict[str, int]]:
    """Split ``tokens`` into new ones and ones already present as special tokens; refuse ordinary tokens."""
    vocab = tok.get_vocab()
    special = {t.content for t in tok.added_tokens_decoder.values() if t.special}
    new, present = [], {}
    for token in tokens:
        if token not in vocab:
            new.append(token)
        elif token in special:
            present[token] = vocab[token]
        else:
            raise NevaError(
                f"token {token!r} already exists at ID {vocab[token]} as an ordinary (non-special) token; "
                "it cannot become a special token — choose another token"
            )
    return new, present


def add_special_tokens(
    src: Path, dst: Path, tokens: Sequence[str], piece_type: str, *, overwrite: bool
) -> tuple[list[TokenResult], int]:
    """Add ``tokens`` as special tokens and save the tokenizer to ``dst``; return per-token results and vocab size."""
    from tokenizers import AddedToken

    if piece_type != "user_defined":
        raise NevaError(
            f"--type {piece_type} applies to sentencepiece models only; Hugging Face tokenizers take the "
            "tokens as special tokens that match inside text (use the default --type user_defined)"
        )
    tok = load_hf_tokenizer(src)
    new, present = _plan(tok, tokens)
    added = [AddedToken(t, special=True, normalized=False) for t in new]
    tok.add_special_tokens({"extra_special_tokens": added}, replace_extra_special_tokens=False)
    vocab = tok.get_vocab()
    results = [TokenResult(t, vocab[t], created=t not in present) for t in tokens]
    if src.resolve() == dst.resolve():
        if new:
            _save_in_place(tok, dst, results)
    else:
        with atomic_path(dst, kind=HF_TOKENIZER_DIR, overwrite=overwrite) as tmp:
            tok.save_pretrained(str(tmp))
            _verify(tmp, results)
    return results, len(tok)


def _save_in_place(tok: Any, dst: Path, results: list[TokenResult]) -> None:
    """Save into a temporary sibling directory, verify, then move each tokenizer file over its original."""
    remove_stale_temporaries(dst)
    tmp = make_temp(dst, is_dir=True)
    try:
        tok.save_pretrained(str(tmp))
        _verify(tmp, results)
        for item in tmp.iterdir():
            os.replace(item, dst / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _verify(path: Path, results: Sequence[TokenResult]) -> None:
    """Reload the saved tokenizer and check each token's id and that it matches inside text."""
    tok = load_hf_tokenizer(path)
    for r in results:
        got = tok.convert_tokens_to_ids(r.token)
        if got != r.id or r.id not in tok.encode(f"a {r.token} b", add_special_tokens=False):
            raise NevaError(f"verification failed: {r.token!r} is ID {got} in the saved tokenizer, expected {r.id}")
