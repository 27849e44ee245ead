"""``neva data validate`` counts image tokens for the real vision tower (``--config`` or ``--vision``), and a
tokenizer it cannot load is one error about the tokenizer, not one per record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from neva_tools.cli.main import main


@pytest.fixture(scope="module")
def tower(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face CLIP vision config of 28 px images and 7 px patches (16 tokens per image); no weights."""
    clip = tmp_path_factory.mktemp("clip28")
    (clip / "config.json").write_text(json.dumps({"model_type": "clip_vision_model", "image_size": 28,
        "patch_size": 7, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64}))  # fmt: skip
    return clip


def _args(shapes: dict, *extra: str) -> list[str]:
    """The finetune split (vicuna_v1) at max_seq_length 200: about 60 text tokens + an image's tokens."""
    return ["data", "validate", str(shapes["finetune"]), "--image-folder", str(shapes["images"]), "--tokenizer",
            str(shapes["tokenizer"]), "--template", "vicuna_v1", "--max-seq-length", "200", "--no-decode",
            "--no-progress", *extra]  # fmt: skip


def _report(capsys: pytest.CaptureFixture[str]) -> dict:
    return json.loads(capsys.readouterr().out)


def test_records_that_fit_the_towers_tokens_are_valid(shapes: dict, tower: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    records = len(json.loads(Path(shapes["finetune"]).read_text()))
    assert main(_args(shapes, "--json")) == 1  # the 336 px / patch 14 default: 576 tokens per image
    assert _report(capsys)["invalid_by_kind"] == {"too_long": records}

    assert main(_args(shapes, "--json", "--vision", str(tower))) == 0
    report = _report(capsys)
    assert report["ok"] and report["token_length"]["max"] <= 200

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model:\n  mm_cfg:\n    vision_encoder:\n      from_pretrained: {tower}\n")
    assert main(_args(shapes, "--json", "--config", str(recipe))) == 0
    assert _report(capsys)["token_length"] == report["token_length"]


def test_config_layout_keys_count_anyres_tokens(shapes: dict, tower: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """--config's AnyRes keys apply: the 64 px images tile 2 x 2 at 28 px, more tokens than one view."""
    recipe = tmp_path / "anyres.yaml"
    recipe.write_text(f"model:\n  mm_cfg:\n    mm_patch_merge_type: spatial_unpad\n    vision_encoder:\n"
                      f"      from_pretrained: {tower}\n  data:\n    image_aspect_ratio: anyres\n"
                      "    image_grid_pinpoints: (1x1),...,(3x3)\n")  # fmt: skip
    assert main(_args(shapes, "--json", "--vision", str(tower))) == 0
    flat = _report(capsys)["token_length"]["max"]
    assert main(_args(shapes, "--json", "--config", str(recipe), "--max-seq-length", "4096")) == 0
    assert _report(capsys)["token_length"]["max"] > flat + 16


def test_config_alone_checks_the_datasets_it_trains_on(shapes: dict, tower: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    recipe = tmp_path / "train.yaml"
    recipe.write_text(f"model:\n  tokenizer:\n    model: {shapes['tokenizer']}\n  mm_cfg:\n    llm:\n"
                      f"      model_type: vicuna_v1\n    vision_encoder:\n      from_pretrained: {tower}\n  data:\n"
                      f"    data_path: {shapes['finetune']}\n    image_folder: {shapes['images']}\n"
                      "    max_seq_length: 200\n")  # fmt: skip
    records = len(json.loads(Path(shapes["finetune"]).read_text()))
    assert main(["data", "validate", "--config", str(recipe), "--json", "--no-progress"]) == 0
    assert _report(capsys)["records"] == records
    assert main(["data", "validate", "--config", str(recipe), "--set", "model.data.max_seq_length=20", "--json",
                 "--no-progress"]) == 1  # fmt: skip
    assert _report(capsys)["invalid_by_kind"] == {"too_long": records}


def test_a_tower_that_cannot_be_read_is_one_error(shapes: dict, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    assert main(_args(shapes, "--vision", str(tmp_path))) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines() == [f"neva: error: --vision {tmp_path}: {tmp_path} has neither "
                                                 "config.json (Hugging Face CLIP) nor open_clip_config.json "
                                                 "(open_clip)"]  # fmt: skip


@pytest.mark.parametrize("kind", ["missing", "unreadable"])
def test_a_bad_tokenizer_is_one_error_about_the_tokenizer(shapes: dict, tmp_path: Path, kind: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    tok = tmp_path / "tokenizer.model"
    if kind == "unreadable":
        tok.write_bytes(b"not a sentencepiece model")
    args = ["data", "validate", str(shapes["finetune"]), "--image-folder", str(shapes["images"]), "--tokenizer",
            str(tok), "--template", "vicuna_v1", "--no-progress"]  # fmt: skip
    assert main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1, captured.err
    why = f"tokenizer {tok} does not exist" if kind == "missing" else f"{tok} is not a sentencepiece model"
    assert lines[0].startswith(f"neva: error: cannot check token lengths: {why}"), lines[0]
