"""One small interface over sentencepiece models and Hugging Face tokenizers, for the data pipeline."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from neva_tools.errors import NevaError


class TextTokenizer:
    """Encode/decode text and look up special tokens, whatever the tokenizer library.

    ``encode`` never adds BOS/EOS: templates place them explicitly.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._sp: Any = None
        self._hf: Any = None
        if self.path.is_dir():
            from neva_tools.tokenizer.hf_tokenizer import load_hf_tokenizer

            self._hf = load_hf_tokenizer(self.path)
        elif self.path.is_file():
            import sentencepiece as spm

            try:
                self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
            except (OSError, RuntimeError) as exc:
                raise NevaError(f"{self.path} is not a sentencepiece model ({exc})") from None
        else:
            raise NevaError(f"tokenizer {self.path} does not exist")

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._sp.get_piece_size() if self._sp is not None else len(self._hf)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS."""
        if self._sp is not None:
            return list(self._sp.encode(text))
        return list(self._hf.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``."""
        return self._sp.decode(ids) if self._sp is not None else self._hf.decode(ids)

    def token_id(self, token: str) -> int | None:
        """The id of a single piece/token (e.g. ``<|im_end|>``), or None when the vocabulary lacks it."""
        if self._sp is not None:
            idx = self._sp.piece_to_id(token)
            return None if idx == self._sp.unk_id() and token != self._sp.id_to_piece(idx) else idx
        idx = self._hf.convert_tokens_to_ids(token)
        return None if idx is None or (idx == self._hf.unk_token_id and token != self._hf.unk_token) else idx

    @property
    def bos_id(self) -> int | None:
        """BOS id, or None."""
        if self._sp is not None:
            return self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        return self._hf.bos_token_id

    @property
    def eos_id(self) -> int | None:
        """EOS id, or None."""
        if self._sp is not None:
            return self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        return self._hf.eos_token_id

    @property
    def pad_id(self) -> int:
        """Padding id: the tokenizer's pad, else EOS, else 0."""
        if self._sp is not None and self._sp.pad_id() >= 0:
            return self._sp.pad_id()
        if self._hf is not None and self._hf.pad_token_id is not None:
            return self._hf.pad_token_id
        return self.eos_id if self.eos_id is not None else 0
