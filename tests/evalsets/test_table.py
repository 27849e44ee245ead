"""``neva_tools.evalsets.table``: CircularEval scoring and VLMEvalKit's table, on scripted answers counted by hand."""

from __future__ import annotations

from pathlib import Path

from evalset_files import shapes_questions, write_tsv

from neva_tools.evalsets.mmbench import GROUP, questions_to_ask, read_tsv
from neva_tools.evalsets.table import format_table, per_question_tsv, score

G = GROUP
#: Scripted answers per asked row (see shapes_questions for the options of each rotation).
ANSWERS = {
    0: "A", G: "red", 2 * G: "B.",  # red: A / C (by its text) / B: every rotation right
    1: "B", 1 + G: "A", 1 + 2 * G: "D", 1 + 3 * G: "The answer is B",  # circle is C in the last rotation: wrong
    2: "I think so", 2 + G: "B", 2 + 2 * G: "A",  # no letter in the first rotation: wrong
    3: "B", 3 + G: "(A)",  # blue: B then A: right
    4: "yes", 4 + G: "no",  # no answer key: predicted only
}  # fmt: skip


def _asked(tmp_path: Path, circular: bool):
    return questions_to_ask(read_tsv(write_tsv(tmp_path / "mmb.tsv", shapes_questions())), circular)


def test_circular_scoring_by_hand(tmp_path: Path) -> None:
    asked = _asked(tmp_path, circular=True)
    scored = score(asked, {q.index: ANSWERS[q.index] for q in asked})
    assert scored.hits == {0: 1, 1: 0, 2: 0, 3: 1} and scored.predict_only == [4]
    assert scored.unmatched == [2]  # "I think so" ("yes" and "no" are option texts)
    assert scored.table == {"dev": {"Overall": 2 / 4, "CP": 0 / 1, "FP-S": 2 / 3, "attribute_recognition": 2 / 2,
                                    "image_topic": 0 / 1, "object_localization": 0 / 1}}  # fmt: skip
    first = {row["index"]: row for row in scored.rows}
    assert first[G]["extracted"] == "C" and first[G]["A"] == "blue" and first[G]["hit"] == ""
    assert first[1]["hit"] == 0 and "index 3000001: answer C, extracted B" in first[1]["log"]
    assert first[2]["log"] == "index 2: answer C, extracted no letter (unmatched)"


def test_plain_scoring_and_circular_is_not_above_it(tmp_path: Path) -> None:
    asked = _asked(tmp_path, circular=False)
    plain = score(asked, {q.index: ANSWERS[q.index] for q in asked})
    assert plain.hits == {0: 1, 1: 1, 2: 0, 3: 1}
    assert plain.table["dev"] == {"Overall": 3 / 4, "CP": 1 / 1, "FP-S": 2 / 3, "attribute_recognition": 1.0,
                                  "image_topic": 1.0, "object_localization": 0.0}  # fmt: skip
    circular = score(_asked(tmp_path, True), ANSWERS)
    assert all(circular.table["dev"][k] <= v for k, v in plain.table["dev"].items())


def test_per_question_tsv_reads_back(tmp_path: Path) -> None:
    import csv
    import io

    asked = _asked(tmp_path, circular=True)
    text = per_question_tsv(score(asked, {**ANSWERS, 0: "A\tB\nC"}).rows)
    rows = list(csv.DictReader(io.StringIO(text), delimiter="\t"))
    assert [int(r["index"]) for r in rows] == [q.index for q in asked]
    assert rows[0]["prediction"] == "A\tB\nC" and rows[0]["hit"] == "0"  # quoted cells survive


#: The table at the end of the LLaVA-NeXT seed (MMBench_DEV_EN, VLMEvalKit), character for character.
SEED = """\
--------------------------------------  --------------------
split                                   dev
Overall                                 0.5420962199312714
AR                                      0.6331658291457286
CP                                      0.6554054054054054
FP-C                                    0.44755244755244755
FP-S                                    0.5426621160409556
LR                                      0.2966101694915254
RR                                      0.4608695652173913
action_recognition                      0.8703703703703703
attribute_comparison                    0.22727272727272727
attribute_recognition                   0.6486486486486487
celebrity_recognition                   0.6767676767676768
function_reasoning                      0.7088607594936709
future_prediction                       0.4
identity_reasoning                      0.8888888888888888
image_emotion                           0.72
image_quality                           0.018867924528301886
image_scene                             0.9326923076923077
image_style                             0.6226415094339622
image_topic                             0.75
nature_relation                         0.3958333333333333
object_localization                     0.2222222222222222
ocr                                     0.6666666666666666
physical_property_reasoning             0.4
physical_relation                       0.20833333333333334
social_relation                         0.6744186046511628
spatial_relationship                    0.15555555555555556
structuralized_imagetext_understanding  0.24358974358974358
--------------------------------------  --------------------"""


def test_format_reproduces_the_seed_table() -> None:
    cells = {line[:40].strip(): float(line[40:]) for line in SEED.splitlines()[2:-1]}
    assert format_table({"dev": cells}) == SEED
    assert format_table({"dev": {"Overall": 0.5}, "test": {"Overall": None}}).splitlines()[1:3] == [
        "split    dev  test", "Overall  0.5"]  # fmt: skip


def test_ccbench_layout_without_l2_category(tmp_path: Path) -> None:
    from evalset_files import HEADER

    header = [h for h in HEADER if h not in ("hint", "l2-category")]  # CCBench's columns
    asked = questions_to_ask(read_tsv(write_tsv(tmp_path / "cc.tsv", shapes_questions(), header)), circular=True)
    table = score(asked, ANSWERS).table
    assert table == {"dev": {"Overall": 2 / 4, "attribute_recognition": 1.0, "image_topic": 0.0,
                             "object_localization": 0.0}}  # fmt: skip
