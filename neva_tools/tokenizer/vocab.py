"""Vocabulary padding as megatron-core does it for vocab-parallel embeddings."""

from __future__ import annotations

from neva_tools.errors import NevaError

DEFAULT_DIVISIBLE_BY = 128


def padded_vocab_size(vocab_size: int, tp: int = 1, divisible_by: int = DEFAULT_DIVISIBLE_BY) -> int:
    """Round ``vocab_size`` up to a multiple of ``divisible_by * tp`` (megatron's ``make_vocab_size_divisible_by``)."""
    if vocab_size < 1 or tp < 1 or divisible_by < 1:
        raise NevaError(
            f"vocab_size ({vocab_size}), tp ({tp}) and make_vocab_size_divisible_by ({divisible_by}) must be positive"
        )
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple
