"""``neva_tools.evalsets.extract``: VLMEvalKit's exact-matching letter extraction, case by case."""

from __future__ import annotations

import pytest

from neva_tools.evalsets.extract import infer_letter, infer_option, infer_text

CHOICES = {"A": "red", "B": "blue", "C": "green"}


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("A", "A"),  # the letter alone
        ("B.", "B"),  # separators become spaces
        ("(C)", "C"),
        ("[B]: blue", "B"),
        ("The answer is B", "B"),  # one letter among the last five words
        ("C. green", "C"),
        ("A B", None),  # two letters: not an option answer; no option text either
        ("The answer is C because the circle in this picture is clearly drawn", None),  # letter too early
        ("Cannot determine the answer from this image", "Z"),  # a refusal
        ("Z", "Z"),  # the "no option" letter with no option letter
        ("D", None),  # not one of the options: no option, no text
        ("a", None),  # lower case is not a letter
    ],
)
def test_infer_option(answer: str, expected: str | None) -> None:
    assert infer_option(answer, CHOICES) == expected


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("red", "A"),
        ("It is Green.", "C"),  # case-insensitive
        ("red or blue", None),  # two options' texts
        ("purple", None),
        ("the shape is drawn in a colour that looks like red to me", None),  # longer than twice all options (24)
    ],
)
def test_infer_text(answer: str, expected: str | None) -> None:
    assert infer_text(answer, CHOICES) == expected


def test_infer_letter_tries_the_letter_then_the_text() -> None:
    assert infer_letter("B", CHOICES) == "B"
    assert infer_letter("green", CHOICES) == "C"
    assert infer_letter("A, which is red", CHOICES) == "A"  # letter first
    assert infer_letter("A or B", {"A": "A or B", "B": "x"}) == "A"  # two letters, then the text matches A's
    assert infer_letter("", CHOICES) is None
    assert infer_letter("Sorry, I can't help with images of people yet.", CHOICES) == "Z"
