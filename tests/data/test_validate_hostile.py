"""``neva data validate`` on hostile but realistic input (issue 20, point 3): every case is a per-record problem naming
the record and the reason, or our error (exit 2), never a traceback; the image loading training uses converts 16-bit
and palette images correctly; training refuses what validation refuses."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from neva_tools.cli.main import main
from neva_tools.data import images as images_mod
from neva_tools.data.dataset import load_items
from neva_tools.data.images import ImageProcessor
from neva_tools.data.registry import DatasetSpec, DatasetUse
from neva_tools.errors import NevaError

CONV = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]


def _ok(rid: str = "ok", **extra: object) -> dict:
    return {"id": rid, "image": "a.png", "conversations": CONV, **extra}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "img"
    root.mkdir()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(root / "a.png")
    return root


def _validate(capsys: pytest.CaptureFixture[str], path: Path, *extra: str) -> tuple[int, dict, str]:
    """(exit status, the --json report, stderr) of ``neva data validate`` run in this process."""
    rc = main(["data", "validate", str(path), "--no-progress", "--json", *extra])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, (json.loads(out) if rc != 2 else {}), err


def _problems(report: dict) -> list[tuple[str, str | None, str]]:
    return [(p["location"], p["record_id"], p["kind"]) for p in report["problems"]]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# 1. a UTF-8 byte-order mark
@pytest.mark.parametrize("suffix", ["json", "jsonl"])
def test_byte_order_mark_is_skipped(tmp_path: Path, folder: Path, capsys: pytest.CaptureFixture[str],
                                    suffix: str) -> None:  # fmt: skip
    rows = [_ok("a"), _ok("b")]
    body = json.dumps(rows, indent=1) if suffix == "json" else "".join(json.dumps(r) + "\n" for r in rows)
    path = tmp_path / f"bom.{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    rc, report, _ = _validate(capsys, path, "--image-folder", str(folder))
    assert (rc, report["records"], report["problems"]) == (0, 2, [])


# 2. nesting far deeper than any record
def test_deep_nesting_is_one_problem_naming_the_line(tmp_path: Path, folder: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    deep = "[" * 100_000 + "]" * 100_000
    path = tmp_path / "deep.jsonl"
    path.write_text(json.dumps(_ok("a")) + "\n" + deep + "\n" + '{"id": "x", "c": ' + "[" * 70 + "]" * 70 + "}\n"
                    + json.dumps(_ok("b")) + "\n")  # fmt: skip
    rc, report, _ = _validate(capsys, path, "--image-folder", str(folder))
    assert rc == 1 and report["records"] == 4
    assert _problems(report) == [("line 2", None, "too_deep"), ("line 3", None, "too_deep")]
    assert "nested deeper than 64" in report["problems"][0]["message"]


def test_deep_nesting_in_a_json_list_keeps_the_records_before_it(
    tmp_path: Path, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "deep.json"
    path.write_text("[\n" + json.dumps(_ok("a")) + ",\n" + "[" * 100_000 + "]" * 100_000 + "\n]")
    rc, report, _ = _validate(capsys, path, "--image-folder", str(folder))
    assert rc == 1 and report["records"] == 2
    assert _problems(report) == [("index 1 (line 3)", None, "too_deep")]


def test_deep_nesting_in_preprocess_names_the_line(tmp_path: Path, sp_model: Path) -> None:
    from neva_tools.data.mmap import preprocess_jsonl

    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "fine"}\n' + '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(NevaError, match=rf"^{src}:2: nested too deeply"):
        preprocess_jsonl(src, tmp_path / "out" / "corpus", sp_model, workers=1, chunk_size=8)


# 3. bytes that are not UTF-8
def test_jsonl_bad_byte_is_its_line_and_the_rest_is_validated(tmp_path: Path, folder: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    good = json.dumps(_ok("a")).encode() + b"\n"
    bad = json.dumps(_ok("b")).replace("red", "r@d").encode().replace(b"@", b"\xff") + b"\n"
    missing = json.dumps(_ok("c", image="nope.png")).encode() + b"\n"
    path = tmp_path / "bad.jsonl"
    path.write_bytes(good + bad + missing)
    rc, report, _ = _validate(capsys, path, "--image-folder", str(folder))
    assert rc == 1 and report["records"] == 3
    assert _problems(report) == [("line 2", None, "not_utf8"), ("line 3", "c", "image_missing")]
    offset = len(good) + bad.index(b"\xff")
    assert f"byte 0xff at byte offset {offset}" in report["problems"][0]["message"]


def test_json_bad_byte_names_record_line_and_offset(tmp_path: Path, folder: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    head = b"[\n" + json.dumps(_ok("a")).encode() + b",\n"
    bad = json.dumps(_ok("b")).replace("red", "r@d").encode().replace(b"@", b"\xfe")
    path = tmp_path / "bad.json"
    path.write_bytes(head + bad + b",\n" + json.dumps(_ok("c", image="nope.png")).encode() + b"\n]\n")
    rc, report, _ = _validate(capsys, path, "--image-folder", str(folder))
    assert rc == 1 and report["records"] == 3
    assert _problems(report) == [("index 1 (line 3)", None, "not_utf8"), ("index 2", "c", "image_missing")]
    offset = len(head) + bad.index(b"\xfe")
    assert f"byte 0xfe at byte offset {offset}, line 3" in report["problems"][0]["message"]


# 4. decompression bombs, pixel limits, 16-bit and palette images
def test_decompression_bomb_is_one_record_and_validation_goes_on(tmp_path: Path, folder: Path,
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    Image.new("L", (200, 200)).save(folder / "bomb.png")
    Image.new("L", (50, 50)).save(folder / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 200×200 is beyond PIL's 2× bomb threshold
    monkeypatch.setattr(images_mod, "MAX_PIXELS", 2_000)  # ours: 50×50 is above the limit, 4×4 below
    path = _jsonl(tmp_path / "d.jsonl", [_ok("bomb", image="bomb.png"), _ok("big", image="big.png"), _ok("a"),
                                         _ok("m", image="nope.png")])  # fmt: skip
    for args in ([], ["--no-decode", "--image-aspect-ratio", "anyres", "--image-grid-pinpoints", "(1x1),...,(2x2)",
                      "--image-size", "28", "--patch-size", "7"]):  # fmt: skip
        rc, report, _ = _validate(capsys, path, "--image-folder", str(folder), *args)
        assert rc == 1 and report["records"] == 4
        assert _problems(report) == [("line 1", "bomb", "image_unreadable"), ("line 2", "big", "image_unreadable"),
                                     ("line 4", "m", "image_missing")]  # fmt: skip
        assert "2500 pixels, above the limit of 2000" in report["problems"][1]["found"]


def test_16bit_greyscale_is_scaled_not_clipped(tmp_path: Path, folder: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    values = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(values).save(folder / "deep.png")
    assert Image.open(folder / "deep.png").mode.startswith("I;16")
    rgb = np.asarray(ImageProcessor().open(folder / "deep.png"))
    assert rgb.shape == (64, 64, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    assert np.abs(rgb[..., 0].astype(float) - values / 257).max() <= 0.5
    assert (rgb == 255).mean() < 0.01  # PIL's convert("RGB") clips: 99.6% white
    rc, report, _ = _validate(capsys, _jsonl(tmp_path / "d.jsonl", [_ok(image="deep.png")]),
                              "--image-folder", str(folder))  # fmt: skip
    assert rc == 0 and report["images"] == 1


def test_palette_images_go_through_their_palette(folder: Path) -> None:
    img = Image.new("P", (4, 2))
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.putdata([0, 1] * 4)
    img.save(folder / "p.png", transparency=1)
    rgb = np.asarray(ImageProcessor().open(folder / "p.png"))
    assert rgb[0, 0].tolist() == [10, 20, 30] and rgb[0, 1].tolist() == [200, 100, 50]
    Image.fromarray(np.ones((3, 3), np.float32)).save(folder / "f.tiff")
    with pytest.raises(NevaError, match="32-bit float"):
        ImageProcessor().open(folder / "f.tiff")


# 5. malformed image fields
def test_malformed_image_fields_are_reported_per_record(tmp_path: Path, folder: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    conv = CONV
    rows = [{"id": "n", "image": 5, "conversations": conv}, {"id": "s", "images": "a.png", "conversations": conv},
            {"id": "l", "images": [1], "conversations": conv}, {"id": "d", "images": {"a": 1}, "conversations": conv},
            {"id": "e", "image": "", "conversations": conv},
            {"id": "b", "image": "a.png", "images": ["a.png"], "conversations": conv}, _ok("ok")]  # fmt: skip
    rc, report, _ = _validate(capsys, _jsonl(tmp_path / "d.jsonl", rows), "--image-folder", str(folder))
    assert rc == 1 and report["records"] == 7 and report["invalid_records"] == 6
    assert {(loc, kind) for loc, _, kind in _problems(report)} == {
        (f"line {i}", "bad_image_field") for i in range(1, 7)}  # fmt: skip


# 6. image paths outside the image folder
def test_paths_are_confined_to_the_image_folder(tmp_path: Path, folder: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    (tmp_path / "x.png").write_bytes(b"")
    rows = [_ok("up", image="../x.png"), _ok("abs", image="/etc/passwd"), _ok("in", image="./a.png")]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    rc, report, _ = _validate(capsys, path, "--image-folder", str(folder))
    assert rc == 1
    assert _problems(report) == [("line 1", "up", "image_outside_folder"), ("line 2", "abs", "image_outside_folder")]
    assert "--allow-outside" in report["problems"][0]["message"]
    rc, report, _ = _validate(capsys, path, "--image-folder", str(folder), "--allow-outside")
    assert rc == 1 and {kind for _, _, kind in _problems(report)} == {"image_unreadable"}  # opened, not refused
    rc, report, _ = _validate(capsys, _jsonl(tmp_path / "abs.jsonl", [_ok("abs", image=str(folder / "a.png"))]))
    assert rc == 0  # no folder: absolute paths are taken as they are


def test_training_refuses_paths_outside_the_folder_unless_allowed(tmp_path: Path, folder: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [_ok("a"), _ok("up", image="../../x.png")])
    use = DatasetUse(DatasetSpec("d", path, folder, "plain"))
    with pytest.raises(NevaError, match=r"1 records training cannot use .*d\.jsonl:line 2 \(id up\).*leaves the image"):
        load_items([use], None, 0)
    assert len(load_items([use], None, 0, allow_outside=True)) == 2
    assert len(load_items([DatasetUse(DatasetSpec("d", path, None, "plain"))], None, 0)) == 2


def test_config_has_the_allow_outside_key() -> None:
    import yaml

    cfg = yaml.safe_load((Path(__file__).parents[2] / "conf" / "neva_config.yaml").read_text())
    assert cfg["model"]["data"]["allow_outside_image_folder"] is False


# 7. video records
def test_unusable_video_records_are_refused_in_validate_and_training(
    tmp_path: Path, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from video_clips import write_clip

    (folder / "v.mp4").write_bytes(b"\0")
    write_clip(folder / "short.mp4", 2)
    write_clip(folder / "ok.mp4", 12)
    text = [{"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "a"}]
    plain = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    rows = [{"id": "v", "video": "v.mp4", "conversations": text},  # 1 corrupt
            {"id": "t", "conversations": text},  # 2 a tag without a video
            {"id": "f", "video": "ok.mp4", "conversations": plain},  # 3 a video without its tag
            {"id": "s", "video": "short.mp4", "conversations": text},  # 4 2 frames < video_min_frames 4
            {"id": "b", "video": "ok.mp4", "image": "a.png", "conversations": text},  # 5 both
            {"id": "m", "video": "gone.mp4", "conversations": text},  # 6 missing
            {"id": "o", "video": "../ok.mp4", "conversations": text},  # 7 outside the folder
            {"id": "ok", "video": "ok.mp4", "conversations": text}]  # 8 valid  # fmt: skip
    path = _jsonl(tmp_path / "v.jsonl", rows)
    rc, report, _ = _validate(capsys, path, "--image-folder", str(folder))
    assert rc == 1 and _problems(report) == [
        ("line 1", "v", "video_unreadable"), ("line 2", "t", "video_count_mismatch"),
        ("line 3", "f", "video_count_mismatch"), ("line 4", "s", "video_too_short"),
        ("line 5", "b", "bad_video_field"), ("line 5", "b", "image_count_mismatch"),
        ("line 6", "m", "video_missing"), ("line 7", "o", "video_outside_folder")]  # fmt: skip
    assert report["videos"] == 7 and report["invalid_records"] == 7
    short = report["problems"][3]["found"]
    assert "0.20 s, 2 frames at 10 fps" in short and "fewer than video_min_frames (4)" in short
    with pytest.raises(NevaError, match=r"4 records training cannot use .*no 'video'"):
        load_items([DatasetUse(DatasetSpec("v", path, folder, "plain"))], None, 0)


# 8. the report itself: over-long paths, unprintable characters, text no tokenizer encodes
def test_long_paths_and_unprintable_characters_are_escaped_in_the_report(
    tmp_path: Path, folder: Path, shapes: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [_ok("long", image="x" * 5000), _ok("ctl\x1b[31m\x00", image="a\x07.png"),
            {"id": "s", "conversations": [{"from": "human", "value": "q\ud800"}, {"from": "gpt", "value": "a"}]},
            {"id": "\udcff", "conversations": [{"from": "robot", "value": "q"}, {"from": "gpt", "value": "a"}]},
            ]  # fmt: skip
    path = _jsonl(tmp_path / "d.jsonl", rows)
    args = ["data", "validate", str(path), "--image-folder", str(folder), "--no-progress", "--tokenizer",
            str(shapes["tokenizer"]), "--template", "vicuna_v1"]  # fmt: skip
    assert main(args) == 1
    out, err = capsys.readouterr()
    out.encode("utf-8")  # printable: no lone surrogate reached stdout
    assert "Traceback" not in err and "\x1b" not in out and "\x00" not in out and "\x07" not in out
    assert r"(id ctl\x1b[31m\x00)" in out and r"a\x07.png" in out and r"(id \udcff)" in out
    assert max(len(line) for line in out.splitlines()) < 1200
    assert "line 1 (id long): image_missing" in out and "line 3 (id s): bad_text" in out


# fuzz: mutated LLaVA records never crash the validator
_HOSTILE = [b"\xff", b"\xef\xbb\xbf", b"[", b"{", b"]", b"\x00", b"\x1b", b'"', b"\\", b"../", b"<video>", b"<image>",
            b"\n", b",", b"\\ud800", b"/etc/passwd", b"x" * 300, b"null", b"1e999", b"[[[", b"\\u0000"]  # fmt: skip


def _mutate(data: bytes, ops: list[tuple[int, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, at, pick in ops:
        at = at % (len(out) + 1)
        chunk = _HOSTILE[pick % len(_HOSTILE)] if pick % 3 else bytes([pick % 256])
        if kind == 0:
            out[at:at] = chunk
        elif kind == 1:
            out[at : at + len(chunk)] = chunk
        else:
            del out[at : at + 1 + pick % 8]
    return bytes(out)


@pytest.fixture(scope="module")
def fuzz_base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("fuzzimg")
    Image.new("RGB", (4, 4)).save(root / "a.png")
    rng = random.Random(20)
    rows = [_ok(str(i), image=rng.choice(["a.png", "b.png"])) for i in range(3)]
    rows.append({"id": "t", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]})
    rows.append({"id": "m", "images": ["a.png", "a.png"], "conversations": [
        {"from": "human", "value": "<image><image> same?"}, {"from": "gpt", "value": "yes"}]})  # fmt: skip
    return root, rows


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
@given(json_list=st.booleans(),
       ops=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 10_000), st.integers(0, 10_000)), min_size=1,
                    max_size=6))  # fmt: skip
def test_fuzz_mutated_records_exit_0_1_or_2(tmp_path_factory: pytest.TempPathFactory, shapes: dict,
                                             fuzz_base: tuple[Path, list[dict]], capsys: pytest.CaptureFixture[str],
                                             json_list: bool, ops: list[tuple[int, int, int]]) -> None:  # fmt: skip
    folder, rows = fuzz_base
    body = json.dumps(rows, indent=1) if json_list else "".join(json.dumps(r) + "\n" for r in rows)
    path = tmp_path_factory.mktemp("fuzz") / ("f.json" if json_list else "f.jsonl")
    path.write_bytes(_mutate(body.encode(), ops))
    rc = main(["data", "validate", str(path), "--image-folder", str(folder), "--no-progress", "--tokenizer",
               str(shapes["tokenizer"]), "--template", "vicuna_v1", "--max-seq-length", "4096"])  # fmt: skip
    out, err = capsys.readouterr()
    assert rc in (0, 1, 2) and "Traceback" not in err
    out.encode("utf-8")
