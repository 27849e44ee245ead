"""``neva_tools.evalsets.mmbench``: reading MMBench-layout TSVs, VLMEvalKit's prompt, the CircularEval rotations."""

from __future__ import annotations

from pathlib import Path

import pytest
from evalset_files import HEADER, shapes_questions, write_tsv

from neva_tools.errors import NevaError
from neva_tools.evalsets.mmbench import GROUP, build_prompt, decode_image, questions_to_ask, read_tsv, rotations


def test_read_tsv_fields_images_and_missing_values(tmp_path: Path) -> None:
    rows = read_tsv(write_tsv(tmp_path / "mmb.tsv", shapes_questions()))
    assert [q.index for q in rows] == [0, 1, 2, 3, 4]
    assert rows[0].options == {"A": "red", "B": "blue", "C": "green"} and rows[0].hint is None
    assert rows[1].hint == "The image shows one shape." and rows[1].answer == "B"
    assert rows[4].answer is None  # no answer: predicted only
    assert rows[1].image == rows[0].image and rows[3].image == rows[2].image  # "0" / "2": another row's image
    img = decode_image(rows[0])
    assert img.mode == "RGB" and img.size == (28, 28) and img.getpixel((8, 14)) == (220, 30, 30)  # the red circle
    none = shapes_questions()[:1]
    none[0].update(C="None", hint="nan")  # pandas' missing-value spellings, as VLMEvalKit reads them
    assert read_tsv(write_tsv(tmp_path / "na.tsv", none))[0].options == {"A": "red", "B": "blue"}


def test_prompt_as_vlmevalkit_builds_it_for_llava(tmp_path: Path) -> None:
    rows = read_tsv(write_tsv(tmp_path / "mmb.tsv", shapes_questions()))
    assert build_prompt(rows[1]) == ("The image shows one shape.\nWhat shape is in the image?\nA. square\nB. circle\n"
                                     "C. triangle\nD. star\nAnswer with the option's letter from the given choices "
                                     "directly.")  # fmt: skip
    cn = shapes_questions()[:1]
    cn[0].update(question="图形是什么颜色？", A="红", B="蓝", C="绿")
    assert build_prompt(read_tsv(write_tsv(tmp_path / "cn.tsv", cn))[0]) == (
        "图形是什么颜色？\nA. 红\nB. 蓝\nC. 绿\n请直接回答选项字母。"
    )


def test_rotations_move_the_options_and_the_answer(tmp_path: Path) -> None:
    q = read_tsv(write_tsv(tmp_path / "mmb.tsv", shapes_questions()))[1]  # square, circle*, triangle, star
    rotated = list(rotations(q))
    assert [r.index for r in rotated] == [1 + GROUP, 1 + 2 * GROUP, 1 + 3 * GROUP]
    assert [list(r.options.values()) for r in rotated] == [["circle", "triangle", "star", "square"],
                                                           ["triangle", "star", "square", "circle"],
                                                           ["star", "square", "circle", "triangle"]]  # fmt: skip
    assert [r.answer for r in rotated] == ["A", "D", "C"]  # circle's letter in each
    assert all(r.options[r.answer] == "circle" and r.group == 1 for r in rotated)


def test_questions_to_ask_circular_plain_and_given_rotations(tmp_path: Path) -> None:
    rows = read_tsv(write_tsv(tmp_path / "mmb.tsv", shapes_questions()))
    circular = questions_to_ask(rows, circular=True)
    assert len(circular) == 3 + 4 + 3 + 2 + 2 and [q.index for q in circular[:3]] == [0, GROUP, 2 * GROUP]
    assert [q.index for q in questions_to_ask(rows, circular=False)] == [0, 1, 2, 3, 4]
    first = shapes_questions()[0]
    given = [first, {**first, "index": GROUP, "A": "blue", "B": "red", "answer": "B"}]
    asked = questions_to_ask(read_tsv(write_tsv(tmp_path / "given.tsv", given)), circular=True)
    assert [(q.index, q.answer) for q in asked] == [(0, "A"), (GROUP, "B")]  # the file's own rotations, as they are
    assert [q.index for q in questions_to_ask(read_tsv(tmp_path / "given.tsv"), circular=False)] == [0]
    orphan = [{**shapes_questions()[0], "index": 5 + GROUP}, shapes_questions()[2]]
    with pytest.raises(NevaError, match="rotations of a question the file does not hold"):
        questions_to_ask(read_tsv(write_tsv(tmp_path / "orphan.tsv", orphan)), circular=True)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"index": "x"}, "line 2: column index must be an integer, found 'x'"),
        ({"answer": "D"}, "line 2: column answer is 'D', not one of this question's options A, B, C"),
        ({"B": "", "C": ""}, "line 2: a question needs at least two options"),
        ({"image": "bm90IGFuIGltYWdl" * 8}, "line 2 (index 0), column image: not a base64-encoded image"),
        ({"image": "7"}, "line 2: column image is '7': too short for a base64 image"),
        ({"image": ""}, "line 2: column image is empty"),
    ],
)
def test_bad_rows_name_file_line_and_column(tmp_path: Path, change: dict, message: str) -> None:
    path = write_tsv(tmp_path / "bad.tsv", [{**shapes_questions()[0], **change}])
    with pytest.raises(NevaError, match="bad.tsv:" + message.replace("(", r"\(").replace(")", r"\)")):
        for q in read_tsv(path):
            decode_image(q, path)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(NevaError, match=r"column\(s\) image missing from the header"):
        read_tsv(write_tsv(tmp_path / "noimg.tsv", [], [h for h in HEADER if h != "image"]))
    with pytest.raises(NevaError, match="holds no questions"):
        read_tsv(write_tsv(tmp_path / "empty.tsv", []))
    with pytest.raises(NevaError, match="index 0 repeats line 2"):
        read_tsv(write_tsv(tmp_path / "dup.tsv", shapes_questions()[:1] * 2))
    with pytest.raises(NevaError, match="does not exist"):
        read_tsv(tmp_path / "gone.tsv")
    no_answer = write_tsv(tmp_path / "test.tsv", shapes_questions(), [h for h in HEADER if h != "answer"])
    assert all(q.answer is None for q in read_tsv(no_answer))  # a test split: predicted only
