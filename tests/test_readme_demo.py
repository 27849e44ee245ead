"""The README's demo figures are the demo's: its question kinds, their chance levels and question counts, and an
accuracy per kind within what the demo can give (the figures themselves were measured with ``make demo``)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from neva_tools.demo import CANDIDATES, run

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_states_the_demos_kinds_chance_and_questions() -> None:
    text = " ".join(README.read_text().split())  # one line: the sentence wraps
    stated = re.search(r"Measured in \w+ runs of `make demo`[^:]*: (.+?) \((\d+) questions each\)", text)
    assert stated is not None, "the README's demo sentence is gone or reworded"
    figures = {kind: (int(acc), int(chance))
               for kind, acc, chance in re.findall(r"(\w+) (\d+)% vs (\d+)%", stated.group(1))}  # fmt: skip
    assert set(figures) == set(CANDIDATES)
    for kind, (accuracy, chance) in figures.items():
        assert chance == round(100 / len(CANDIDATES[kind])), kind
        assert chance < accuracy <= 100, kind
    heldout = inspect.signature(run).parameters["heldout"].default
    assert int(stated.group(2)) == heldout  # one question of each kind per held-out image
    low, high = map(int, re.search(r"\((\d+)–(\d+)% so far\)", text).groups())
    assert low <= figures["shape"][0] <= high


def test_readme_states_the_demos_mmbench_run() -> None:
    """The MMBench figures: all held-out questions, CircularEval at most plain (a question counts only when every
    rotation is right), the per-kind figures in the table's order, and the share of multiple-choice records."""
    from neva_tools.demo_mmbench import MC_SHARE

    text = " ".join(README.read_text().split())
    stated = re.search(r"CircularEval Overall ([\d.]+)% of (\d+) questions \(colour ([\d.]+)%, position ([\d.]+)%, "
                       r"shape ([\d.]+)%\), plain ([\d.]+)%", text)  # fmt: skip
    assert stated is not None, "the README's MMBench sentence is gone or reworded"
    overall, questions, colour, position, shape, plain = (float(g) for g in stated.groups())
    heldout = inspect.signature(run).parameters["heldout"].default
    assert questions == len(CANDIDATES) * heldout and overall <= plain <= 100
    assert abs(overall - (colour + position + shape) / 3) < 0.1  # as many questions of each kind
    assert f"{round(100 * MC_SHARE)}% of stage 2's records" in text
