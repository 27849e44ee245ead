"""The option letter of a free-text answer, as VLMEvalKit's exact matching finds it (no LLM judge).

VLMEvalKit's ``can_infer`` (``vlmeval/utils/matching_util.py``) first looks for the option letter itself
(:func:`infer_option`): the answer with ``.()[],:;!*#{}`` turned into spaces is split into words; when exactly one
word is an option letter and it is among the last five words, that letter is the answer; a refusal sentence, or a
lone ``Z`` with no option letter, is ``Z`` (no option). Else the option texts (:func:`infer_text`): when the answer
is at most twice as long as all option texts together and exactly one option's text (lower case) is in it, that
option. Anything else is unmatched (``None``): with an LLM judge VLMEvalKit would then ask the judge; without one
(``exact_matching``) the question counts as wrong, as here. VLMEvalKit's ``VERBOSE`` quantifier check ("A" in a
long answer) is off by default there and not reproduced.
"""

from __future__ import annotations

from collections.abc import Mapping

#: Answers VLMEvalKit reads as a refusal (``Z``) wherever they occur.
REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_SEPARATORS = ".()[],:;!*#{}"
REFUSED = "Z"  #: the "no option" answer


def words(answer: str) -> list[str]:
    """``answer`` split into words once the separator characters are spaces."""
    return answer.translate({ord(c): " " for c in _SEPARATORS}).split()


def infer_option(answer: str, choices: Mapping[str, str]) -> str | None:
    """The option letter named in ``answer`` (``Z`` for a refusal), or None."""
    if any(refusal in answer for refusal in REFUSALS):
        return REFUSED
    tokens = words(answer)
    named = [letter for letter in choices if letter in tokens]
    if len(named) == 1:
        return named[0] if tokens.index(named[0]) > len(tokens) - 5 else None
    if not named and REFUSED in tokens:
        return REFUSED
    return None


def infer_text(answer: str, choices: Mapping[str, str]) -> str | None:
    """The one option whose text occurs in ``answer`` (case-insensitive), or None (none, several, or an answer more
    than twice as long as all option texts together)."""
    lowered = answer.lower()
    if len(lowered) > 2 * sum(len(str(text)) for text in choices.values()):
        return None
    found = [letter for letter, text in choices.items() if str(text).lower() in lowered]
    return found[0] if len(found) == 1 else None


def infer_letter(answer: str, choices: Mapping[str, str]) -> str | None:
    """VLMEvalKit's ``can_infer``: the option letter, else the option text, else None (unmatched)."""
    answer = str(answer)
    return infer_option(answer, choices) or infer_text(answer, choices)
