"""Adding pieces to sentencepiece models: ids, types, untouched specs, idempotence, conflicts, atomicity."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import sentencepiece as spm

from neva_tools.errors import NevaError
from neva_tools.tokenizer import sentencepiece_model as spmodel
from neva_tools.tokenizer.add_tokens import add_tokens
from neva_tools.tokenizer.tokens import PRESETS, resolve_tokens

NEVA = PRESETS["neva"]


def _types(path: Path, tokens: list[str]) -> list[str]:
    proto = spmodel.load_proto(path)
    by_piece = {p.piece: p for p in proto.pieces}
    return [spmodel.type_name(by_piece[t].type) for t in tokens]


@pytest.mark.parametrize("piece_type", ["user_defined", "control"])
def test_new_pieces_appended_with_ids_types_and_zero_score(sp_model: Path, tmp_path: Path, piece_type: str) -> None:
    before = spmodel.load_proto(sp_model)
    n = len(before.pieces)
    out = tmp_path / "neva.model"
    report = add_tokens(sp_model, out, NEVA, piece_type)
    assert [r.id for r in report.results] == list(range(n, n + 8))
    assert all(r.created for r in report.results)
    assert report.vocab_size == n + 8
    after = spmodel.load_proto(out)
    assert [p.piece for p in after.pieces[n:]] == NEVA
    assert [p.score for p in after.pieces[n:]] == [0.0] * 8
    assert _types(out, NEVA) == [piece_type] * 8


def test_existing_pieces_and_specs_untouched(sp_model: Path, tmp_path: Path) -> None:
    before = spmodel.load_proto(sp_model)
    out = tmp_path / "neva.model"
    add_tokens(sp_model, out, NEVA, "user_defined")
    after = spmodel.load_proto(out)
    n = len(before.pieces)
    assert len(after.pieces) == n + 8
    for i, (old, new) in enumerate(zip(before.pieces, after.pieces[:n], strict=True)):
        assert (old.piece, old.score, old.type) == (new.piece, new.score, new.type), f"piece {i} changed"
    assert after.trainer_spec == before.trainer_spec
    assert after.normalizer_spec == before.normalizer_spec
    assert after.denormalizer_spec == before.denormalizer_spec
    # every other field of the model, compared as a whole with the pieces removed
    rest_before, rest_after = spmodel.ModelProto(), spmodel.ModelProto()
    rest_before.CopyFrom(before)
    rest_after.CopyFrom(after)
    del rest_before.pieces[:]
    del rest_after.pieces[:]
    assert rest_after == rest_before


def test_user_defined_token_encodes_as_one_id_inside_text(sp_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "neva.model"
    report = add_tokens(sp_model, out, NEVA, "user_defined")
    sp = spm.SentencePieceProcessor(model_file=str(out))
    old = spm.SentencePieceProcessor(model_file=str(sp_model))
    text = "A red circle<extra_id_0>in the<extra_id_7> centre."
    pieces = sp.encode(text, out_type=str)
    assert pieces.count("<extra_id_0>") == 1 and pieces.count("<extra_id_7>") == 1
    ids = sp.encode(text)
    assert report.results[0].id in ids and report.results[7].id in ids
    assert len(old.encode("<extra_id_0>")) > 1  # the unextended model splits it into several pieces
    assert sp.decode(ids) == text


def test_control_tokens_do_not_match_in_text(sp_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "neva.model"
    report = add_tokens(sp_model, out, NEVA[:2], "control")
    sp = spm.SentencePieceProcessor(model_file=str(out))
    control_id = report.results[0].id
    assert sp.piece_to_id("<extra_id_0>") == control_id
    assert sp.is_control(control_id)
    assert control_id not in sp.encode("before <extra_id_0> after")


def test_rerun_is_a_noop(sp_model: Path, tmp_path: Path) -> None:
    first = tmp_path / "a.model"
    second = tmp_path / "b.model"
    add_tokens(sp_model, first, NEVA, "user_defined")
    report = add_tokens(first, second, NEVA, "user_defined")
    assert not report.created
    assert second.read_bytes() == first.read_bytes()
    mtime = first.stat().st_mtime_ns
    in_place = add_tokens(first, first, NEVA, "user_defined", in_place=True)
    assert not in_place.created and first.stat().st_mtime_ns == mtime


def test_partial_rerun_adds_only_missing(sp_model: Path, tmp_path: Path) -> None:
    first = tmp_path / "a.model"
    add_tokens(sp_model, first, NEVA[:3], "user_defined")
    report = add_tokens(first, tmp_path / "b.model", NEVA, "user_defined")
    assert [r.created for r in report.results] == [False] * 3 + [True] * 5
    n = len(spmodel.load_proto(sp_model).pieces)
    assert [r.id for r in report.results] == list(range(n, n + 8))


def test_conflict_with_ordinary_piece_names_token_and_id(sp_model: Path, tmp_path: Path) -> None:
    proto = spmodel.load_proto(sp_model)
    idx, piece = next((i, p.piece) for i, p in enumerate(proto.pieces) if p.piece == "▁red")
    out = tmp_path / "x.model"
    with pytest.raises(NevaError, match=rf"'▁red' already exists at ID {idx} as an ordinary piece"):
        add_tokens(sp_model, out, ["<extra_id_0>", piece], "user_defined")
    assert not out.exists()


def test_conflict_with_other_type_names_current_type(sp_model: Path, tmp_path: Path) -> None:
    control = tmp_path / "control.model"
    report = add_tokens(sp_model, control, NEVA[:1], "control")
    with pytest.raises(
        NevaError, match=rf"'<extra_id_0>' already exists at ID {report.results[0].id} with type control"
    ):
        add_tokens(control, tmp_path / "ud.model", NEVA[:1], "user_defined")


@pytest.mark.parametrize("bad", ["", "   ", "<a b>", "\t"])
def test_empty_or_whitespace_tokens_refused(bad: str) -> None:
    with pytest.raises(NevaError, match="whitespace"):
        resolve_tokens([bad], None)


def test_duplicate_and_missing_tokens_refused() -> None:
    with pytest.raises(NevaError, match="given twice"):
        resolve_tokens(["<x>", "<x>"], None)
    with pytest.raises(NevaError, match="no tokens given"):
        resolve_tokens([], None)
    assert resolve_tokens(["<y>"], "neva") == [*NEVA, "<y>"]


def test_output_equal_to_input_needs_in_place(sp_model: Path, tmp_path: Path) -> None:
    model = tmp_path / "t.model"
    model.write_bytes(sp_model.read_bytes())
    with pytest.raises(NevaError, match="--in-place"):
        add_tokens(model, model, NEVA, "user_defined")
    assert model.read_bytes() == sp_model.read_bytes()
    report = add_tokens(model, model, NEVA, "user_defined", in_place=True)
    assert len(report.created) == 8 and len(spmodel.load_proto(model).pieces) == report.vocab_size


def test_existing_output_needs_overwrite(sp_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.model"
    out.write_bytes(b"keep me")
    with pytest.raises(NevaError, match="not a sentencepiece model"):
        add_tokens(sp_model, out, NEVA, "user_defined", overwrite=True)
    assert out.read_bytes() == b"keep me"
    out.write_bytes(sp_model.read_bytes())
    with pytest.raises(NevaError, match="already exists; pass --overwrite"):
        add_tokens(sp_model, out, NEVA, "user_defined")
    add_tokens(sp_model, out, NEVA, "user_defined", overwrite=True)
    assert len(spmodel.load_proto(out).pieces) == len(spmodel.load_proto(sp_model).pieces) + 8


def test_failed_verification_leaves_no_output(sp_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> int:
        raise NevaError("simulated verification failure")

    monkeypatch.setattr(spmodel, "verify_model_file", broken)
    out = tmp_path / "out.model"
    with pytest.raises(NevaError, match="simulated"):
        add_tokens(sp_model, out, NEVA, "user_defined")
    assert os.listdir(tmp_path) == []


def test_interrupt_leaves_no_output(sp_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: object, **kwargs: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(spmodel, "verify_model_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        add_tokens(sp_model, tmp_path / "out.model", NEVA, "user_defined")
    assert os.listdir(tmp_path) == []


def test_not_a_sentencepiece_model(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.model"
    bogus.write_bytes(b"\xff\xfe this is not a protobuf \x00\x01")
    with pytest.raises(NevaError, match=str(bogus)):
        add_tokens(bogus, tmp_path / "out.model", NEVA, "user_defined")
    with pytest.raises(NevaError, match="does not exist"):
        add_tokens(tmp_path / "missing.model", tmp_path / "out.model", NEVA, "user_defined")
