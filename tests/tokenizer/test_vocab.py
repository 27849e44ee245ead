"""Vocabulary padding for vocab-parallel embeddings."""

import pytest

from neva_tools.errors import NevaError
from neva_tools.tokenizer.vocab import padded_vocab_size


@pytest.mark.parametrize(
    ("vocab", "tp", "divisible_by", "expected"),
    [(32000, 1, 128, 32000), (32008, 1, 128, 32128), (32008, 8, 128, 32768), (151665, 4, 128, 152064), (1, 2, 1, 2)],
)
def test_padded_vocab_size(vocab: int, tp: int, divisible_by: int, expected: int) -> None:
    padded = padded_vocab_size(vocab, tp, divisible_by)
    assert padded == expected
    assert padded % (divisible_by * tp) == 0 and 0 <= padded - vocab < divisible_by * tp


def test_padded_vocab_size_rejects_nonpositive() -> None:
    with pytest.raises(NevaError, match=r"tp \(0\)"):
        padded_vocab_size(32000, 0)
