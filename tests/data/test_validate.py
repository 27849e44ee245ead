"""``neva data validate``: every problem kind is reported with its location; valid data passes; fuzzing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from neva_tools.data.records import iter_records
from neva_tools.data.validate import KINDS, Settings, check_record, format_report, validate
from neva_tools.errors import NevaError


def _conv(*pairs: tuple[str, str]) -> list[dict]:
    return [{"from": f, "value": v} for f, v in pairs]


def _bad_records(images: Path) -> list[str]:
    """One JSONL line per structural problem kind (line numbers are 1-based in the order below)."""
    ok = _conv(("human", "<image>\nWhat colour?"), ("gpt", "red"))
    Image.new("RGB", (4, 4)).save(images / "tiny.png")
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    rows = [
        '{"id": "a", "image": "00000.png", "conversations": ' + json.dumps(ok) + "}",  # 1 valid
        '{"id": "b", "image": "00000.png", "conversations": [',  # 2 unparsable_json
        "[1, 2]",  # 3 not_an_object
        json.dumps({"id": "c", "image": "00000.png"}),  # 4 missing_conversations
        json.dumps({"id": "d", "conversations": [{"from": "human"}]}),  # 5 bad_turn
        json.dumps({"id": "e", "conversations": _conv(("robot", "hi"), ("gpt", "x"))}),  # 6 unknown_role
        json.dumps({"id": "f", "conversations": _conv(("human", "a"), ("human", "b"))}),  # 7 roles_not_alternating
        json.dumps({"id": "g", "conversations": _conv(("human", "q"), ("gpt", "  "))}),  # 8 empty_turn
        json.dumps({"id": "h", "image": "00000.png", "conversations": _conv(("human", "no tag"), ("gpt", "x"))}),  # 9
        json.dumps({"id": "i", "image": "00000.png", "conversations": _conv(("human", "what?"), ("gpt", "<image>"))}),
        json.dumps({"id": "j", "image": "nope.png", "conversations": ok}),  # 11 image_missing
        json.dumps({"id": "k", "image": "corrupt.png", "conversations": ok}),  # 12 image_unreadable
        json.dumps({"id": "l", "video": "clip.mp4", "conversations": _conv(("human", "<video>q"), ("gpt", "a"))}),  # 13
    ]
    return rows


EXPECTED = {
    "unparsable_json": ("line 2", None),
    "not_an_object": ("line 3", None),
    "missing_conversations": ("line 4", "c"),
    "bad_turn": ("line 5", "d"),
    "unknown_role": ("line 6", "e"),
    "roles_not_alternating": ("line 7", "f"),
    "empty_turn": ("line 8", "g"),
    "image_count_mismatch": ("line 9", "h"),
    "image_in_answer": ("line 10", "i"),
    "image_missing": ("line 11", "j"),
    "image_unreadable": ("line 12", "k"),
    "video_missing": ("line 13", "l"),
}


def test_every_structural_problem_is_reported_with_location(shapes: dict, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(_bad_records(shapes["images"])) + "\n")
    report = validate([path], Settings(image_folder=str(shapes["images"])))
    assert not report.ok and report.records == 13 and report.invalid_records == 12
    found = {p.kind: (p.location, p.record_id) for p in report.problems}
    for kind, where in EXPECTED.items():
        assert found.get(kind) == where, kind
    assert report.videos == 1 and report.text_only == 4  # d, e, f, g
    missing = next(p for p in report.problems if p.kind == "image_missing")
    assert missing.found == str(shapes["images"] / "nope.png") and missing.file == str(path)
    text = format_report(report)
    assert "FAILED: 12 invalid records" in text and f"{path}:line 11 (id j): image_missing" in text


def test_valid_dataset_passes_with_counts(shapes: dict) -> None:
    report = validate([shapes["finetune"], shapes["pretrain"]], Settings(image_folder=str(shapes["images"])), workers=2)
    assert report.ok and report.records == 24 + 8 and report.images == 32 and report.text_only == 0
    assert format_report(report).endswith("OK: every record is valid")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.sampled_from(
                        ["id", "image", "images", "video", "conversations", "from", "value", "x"]), c, max_size=5),
                    max_leaves=20))  # fmt: skip
def test_fuzz_never_crashes(tmp_path_factory: pytest.TempPathFactory, value: object) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "f.jsonl"
    path.write_text(json.dumps(value) + "\n")
    if value == []:  # no record at all: an empty dataset is an error (neva_tools.data.records.iter_records)
        with pytest.raises(NevaError, match="holds no records"):
            list(iter_records(path))
        return
    for record in iter_records(path):
        problems, _ = check_record(record, Settings(image_folder=None, decode_images=False))
        assert all(p.kind in KINDS for p in problems)


def test_llava_release_shapes_load_as_they_are(shapes: dict, tmp_path: Path) -> None:
    """CC3M-595K chat.json (image at the end of the prompt) and 665K (text-only ShareGPT, model field) records."""
    cc3m = [{"id": "GCC_train_002582585", "image": "00000.png", "conversations": [
        {"from": "human", "value": "Provide a brief description of the given image.\n<image>"},
        {"from": "gpt", "value": "olive oil is a healthy ingredient used liberally ."}]}]  # fmt: skip
    mix665k = [
        {"id": "000000033471", "image": "00001.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
            {"from": "gpt", "value": "The bus in the image is white and red."},
            {"from": "human", "value": "What feature can be seen on the back of the bus?"},
            {"from": "gpt", "value": "The back of the bus features an advertisement."}]},
        {"id": "i6IyJda_0", "model": "", "conversations": [
            {"from": "human", "value": "How to tell if a customer segment is well segmented?"},
            {"from": "gpt", "value": "Look at homogeneity, distinctiveness and size."}]},
    ]  # fmt: skip
    (tmp_path / "chat.json").write_text(json.dumps(cc3m))
    (tmp_path / "mix665k.json").write_text(json.dumps(mix665k))
    settings = Settings(image_folder=str(shapes["images"]), tokenizer=str(shapes["tokenizer"]), template="vicuna_v1")
    report = validate([tmp_path / "chat.json", tmp_path / "mix665k.json"], settings)
    assert report.ok, format_report(report)
    assert report.records == 3 and report.images == 2 and report.text_only == 1 and len(report.lengths) == 3
