"""``add_tokens``: extend a sentencepiece ``.model`` file or a Hugging Face tokenizer directory."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from neva_tools.errors import NevaError
from neva_tools.tokenizer import hf_tokenizer
from neva_tools.tokenizer import sentencepiece_model as spmodel
from neva_tools.tokenizer.tokens import TokenResult
from neva_tools.utils.atomic import HF_TOKENIZER_DIR, SENTENCEPIECE_MODEL, atomic_path, check_output_path


@dataclass(frozen=True)
class AddTokensReport:
    """The outcome of ``add_tokens``: per-token results, the new vocabulary size and where it was written."""

    results: list[TokenResult]
    vocab_size: int
    output: Path
    kind: str  # "sentencepiece" or "huggingface"

    @property
    def created(self) -> list[TokenResult]:
        """The tokens that were added by this call."""
        return [r for r in self.results if r.created]


def _check_paths(src: Path, dst: Path, in_place: bool, overwrite: bool) -> bool:
    """Validate input/output paths; return True when writing in place."""
    if not src.exists():
        raise NevaError(f"tokenizer input {src} does not exist")
    same = dst.resolve() == src.resolve()
    if same and not in_place:
        raise NevaError(f"--output {dst} is the same as --input; pass --in-place to overwrite the input")
    if in_place and not same:
        raise NevaError(f"--in-place given but --output {dst} differs from --input {src}; drop one of them")
    if not same:
        check_output_path(dst, overwrite, HF_TOKENIZER_DIR if src.is_dir() else SENTENCEPIECE_MODEL)
    return same


def add_tokens(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    tokens: Sequence[str],
    piece_type: str = "user_defined",
    *,
    in_place: bool = False,
    overwrite: bool = False,
) -> AddTokensReport:
    """Add ``tokens`` to the tokenizer at ``input_path`` and write it atomically to ``output_path``.

    ``input_path`` is a sentencepiece model file or a directory holding a Hugging Face tokenizer
    (``tokenizer.json`` / ``tokenizer_config.json``). Tokens already present with the same type are
    left as they are (the call is then a no-op for them).
    """
    src, dst = Path(input_path), Path(output_path)
    same = _check_paths(src, dst, in_place, overwrite)
    if src.is_dir():
        results, vocab = hf_tokenizer.add_special_tokens(src, dst, tokens, piece_type, overwrite=overwrite or same)
        return AddTokensReport(results, vocab, dst, "huggingface")

    proto = spmodel.load_proto(src)
    results = spmodel.add_pieces(proto, tokens, piece_type)
    if same and not any(r.created for r in results):
        return AddTokensReport(results, len(proto.pieces), dst, "sentencepiece")
    with atomic_path(dst, kind=SENTENCEPIECE_MODEL, overwrite=True) as tmp:
        tmp.write_bytes(proto.SerializeToString())
        vocab = spmodel.verify_model_file(tmp, results, piece_type)
        shutil.copymode(src, tmp)
    return AddTokensReport(results, vocab, dst, "sentencepiece")
