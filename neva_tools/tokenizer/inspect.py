"""``inspect``: what a tokenizer holds and how a sample text with its special tokens encodes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import sentencepiece as spm

from neva_tools.tokenizer import hf_tokenizer
from neva_tools.tokenizer import sentencepiece_model as spmodel

DEFAULT_SAMPLE = "USER: What is in the picture? ASSISTANT: A red circle."


def _sample_text(text: str | None, specials: list[str]) -> str:
    if text is not None:
        return text
    return f"{' '.join(specials[:8])} {DEFAULT_SAMPLE}".strip()


def inspect_sentencepiece(path: Path, text: str | None = None) -> dict[str, Any]:
    """Summarise a sentencepiece model: size, pieces by type, special ids and a sample encoding."""
    proto = spmodel.load_proto(path)
    by_type: dict[str, list[dict[str, Any]]] = {}
    for idx, piece in enumerate(proto.pieces):
        by_type.setdefault(spmodel.type_name(piece.type), []).append({"id": idx, "piece": piece.piece})
    sp = spm.SentencePieceProcessor(model_file=str(path))
    specials = [p["piece"] for p in by_type.get("user_defined", [])]
    sample = _sample_text(text, specials)
    ids = sp.encode(sample)
    return {
        "kind": "sentencepiece",
        "path": str(path),
        "vocab_size": len(proto.pieces),
        "model_type": spmodel.sp_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type).lower(),
        "counts": {name: len(items) for name, items in sorted(by_type.items())},
        "special_ids": {name: getattr(sp, f"{name}_id")() for name in ("unk", "bos", "eos", "pad")},
        "control": by_type.get("control", []),
        "user_defined": by_type.get("user_defined", []),
        "sample": {"text": sample, "ids": ids, "pieces": [sp.id_to_piece(i) for i in ids]},
    }


def inspect_huggingface(path: Path, text: str | None = None) -> dict[str, Any]:
    """Summarise a Hugging Face tokenizer directory: size, special and added tokens, a sample encoding."""
    tok = hf_tokenizer.load_hf_tokenizer(path)
    added = [{"id": i, "piece": t.content, "special": t.special} for i, t in sorted(tok.added_tokens_decoder.items())]
    specials = [a["piece"] for a in added if a["special"]]
    sample = _sample_text(text, [s for s in specials if s not in (tok.bos_token, tok.eos_token, tok.unk_token)])
    ids = tok.encode(sample, add_special_tokens=False)
    return {
        "kind": "huggingface",
        "path": str(path),
        "class": type(tok).__name__,
        "vocab_size": len(tok),
        "special_ids": {name: getattr(tok, f"{name}_token_id") for name in ("unk", "bos", "eos", "pad")},
        "added_tokens": added,
        "sample": {"text": sample, "ids": ids, "pieces": tok.convert_ids_to_tokens(ids)},
    }


def inspect_tokenizer(path: str | os.PathLike, text: str | None = None) -> dict[str, Any]:
    """Inspect a sentencepiece ``.model`` file or a Hugging Face tokenizer directory."""
    path = Path(path)
    if path.is_dir():
        return inspect_huggingface(path, text)
    return inspect_sentencepiece(path, text)
