"""Training a small sentencepiece model (for demos, tests and new corpora)."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from neva_tools.errors import NevaError
from neva_tools.utils.atomic import SENTENCEPIECE_MODEL, atomic_path, check_output_path


def train_sentencepiece(
    sentences: Iterable[str],
    output: str | os.PathLike,
    vocab_size: int,
    *,
    model_type: str = "bpe",
    user_defined_symbols: Sequence[str] = (),
    byte_fallback: bool = True,
    overwrite: bool = False,
) -> Path:
    """Train a LLaMA-style sentencepiece model (unk=0, bos=1, eos=2) on ``sentences`` and write it atomically."""
    check_output_path(Path(output), overwrite, SENTENCEPIECE_MODEL)
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=buffer,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=1.0,
            byte_fallback=byte_fallback,
            user_defined_symbols=list(user_defined_symbols),
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            hard_vocab_limit=False,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise NevaError(f"sentencepiece training failed: {exc}") from None
    with atomic_path(output, kind=SENTENCEPIECE_MODEL, overwrite=overwrite) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return Path(output)


def read_lines(paths: Sequence[str | os.PathLike]) -> Iterable[str]:
    """Yield the non-empty lines of text files; a missing file is an error naming it."""
    for path in paths:
        if not Path(path).is_file():
            raise NevaError(f"training text {path} does not exist")
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    yield line.rstrip("\n")
