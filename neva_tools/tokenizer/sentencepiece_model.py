"""Adding pieces to a sentencepiece model through the ``sentencepiece_model_pb2`` shipped in the wheel.

Semantics are those of NeMo's ``add_special_tokens_to_sentencepiece.py``: each new piece is appended
at the end of the vocabulary with score 0.0 and the chosen type; existing pieces, the trainer spec
and the normalizer spec are untouched. Unlike NeMo's script, no ``protoc`` run is needed, re-adding a
token is a no-op, conflicts are reported with the existing id and type, and the output is verified
with ``SentencePieceProcessor`` before it is renamed into place.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm
from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from neva_tools.errors import NevaError
from neva_tools.tokenizer.tokens import ADDABLE_TYPES, TokenResult

logger = logging.getLogger(__name__)

ModelProto = sp_pb2.ModelProto
PieceType = ModelProto.SentencePiece.Type


def type_name(piece_type: int) -> str:
    """The lower-case name of a sentencepiece piece type (``normal``, ``control``, ``user_defined`` …)."""
    return PieceType.Name(piece_type).lower()


def load_proto(path: str | os.PathLike) -> ModelProto:
    """Parse a sentencepiece ``.model`` file; a missing or non-sentencepiece file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise NevaError(f"sentencepiece model {path} does not exist or is not a file")
    proto = ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except DecodeError as exc:
        raise NevaError(f"{path} is not a sentencepiece model (protobuf parse failed: {exc})") from None
    if not proto.pieces:
        raise NevaError(f"{path} has no pieces: it is not a sentencepiece model")
    return proto


def add_pieces(proto: ModelProto, tokens: Sequence[str], piece_type: str) -> list[TokenResult]:
    """Append ``tokens`` to ``proto`` in place; tokens already present with the same type are kept as they are.

    A token that exists as a piece of another type (an ordinary piece, or control vs user_defined) is
    an error naming the token and its current id and type.
    """
    if piece_type not in ADDABLE_TYPES:
        raise NevaError(f"piece type {piece_type!r} is not supported; use one of {', '.join(ADDABLE_TYPES)}")
    wanted = PieceType.Value(piece_type.upper())
    existing = {p.piece: (i, p.type) for i, p in enumerate(proto.pieces)}
    results: list[TokenResult] = []
    for token in tokens:
        if token in existing:
            idx, current = existing[token]
            if current != wanted:
                raise NevaError(
                    f"token {token!r} already exists at ID {idx} with type {type_name(current)}, "
                    f"not {piece_type}; choose another token or --type {type_name(current)}"
                    if type_name(current) in ADDABLE_TYPES
                    else f"token {token!r} already exists at ID {idx} as an ordinary piece "
                    f"(type {type_name(current)}); it cannot become a special token — choose another token"
                )
            results.append(TokenResult(token, idx, created=False))
            continue
        proto.pieces.append(ModelProto.SentencePiece(piece=token, score=0.0, type=wanted))
        idx = len(proto.pieces) - 1
        existing[token] = (idx, wanted)
        results.append(TokenResult(token, idx, created=True))
    return results


def verify_model_file(path: Path, results: Sequence[TokenResult], piece_type: str) -> int:
    """Load ``path`` with ``SentencePieceProcessor`` and check every token's id and type; return the vocab size."""
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as exc:
        raise NevaError(f"the edited model does not load in sentencepiece ({exc}); nothing was written") from None
    for r in results:
        got = sp.piece_to_id(r.token)
        if got != r.id:
            raise NevaError(f"verification failed: {r.token!r} has ID {got} in the written model, expected {r.id}")
        if piece_type == "control" and not sp.is_control(got):
            raise NevaError(f"verification failed: {r.token!r} (ID {got}) is not a control piece")
        if piece_type == "user_defined" and got not in sp.encode(r.token):
            raise NevaError(f"verification failed: {r.token!r} (ID {got}) is not matched inside text")
    return sp.get_piece_size()
