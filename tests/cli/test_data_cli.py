"""``neva data`` through the CLI: exit codes, JSON, the mmap round and the mixture lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from neva_tools.cli.main import main
from neva_tools.data import synthetic


def test_validate_exit_codes_and_json(shapes: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["data", "validate", str(shapes["finetune"]), "--image-folder", str(shapes["images"]), "--no-progress"]
    assert main([*args, "--tokenizer", str(shapes["tokenizer"]), "--template", "vicuna_v1",
                 "--max-seq-length", "2048"]) == 0  # fmt: skip
    assert "OK: every record is valid" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "image": "missing.png", "conversations": []}\n')
    assert main(["data", "validate", str(bad), "--image-folder", str(shapes["images"]), "--json", "--no-progress"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["invalid_by_kind"] == {"image_missing": 1, "missing_conversations": 1}


def test_pack_reports_fill_ratio(shapes: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "plan.json"
    assert main(["data", "pack", str(shapes["finetune"]), "--image-folder", str(shapes["images"]), "--tokenizer",
                 str(shapes["tokenizer"]), "--template", "vicuna_v1", "--max-seq-length", "2048", "--output",
                 str(plan), "--no-progress"]) == 0  # fmt: skip
    assert "fill ratio" in capsys.readouterr().out
    bins = json.loads(plan.read_text())["bins"]
    assert sorted(i for b in bins for i in b) == list(range(24))


def test_preprocess_count_and_mixture(shapes: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": line}) + "\n" for line in synthetic.corpus()))
    prefix = tmp_path / "corpus"
    assert main(["data", "preprocess", "--input", str(corpus), "--output-prefix", str(prefix), "--tokenizer",
                 str(shapes["tokenizer"]), "--append-eod", "--no-progress"]) == 0  # fmt: skip
    assert "documents" in capsys.readouterr().out
    assert main(["data", "count-tokens", f"{prefix}_text_document"]) == 0
    assert f"{len(synthetic.corpus()):,} documents" in capsys.readouterr().out
    config = tmp_path / "mix.yaml"
    config.write_text(f"global_batch_size: 4\nseq_length: 32\ntrain_iters: 10\n"
                      f"datasets:\n  - prefix: {prefix}_text_document\n    ratio: 1.0\n")  # fmt: skip
    assert main(["data", "mixture", str(config)]) == 0
    out = capsys.readouterr().out
    assert "TRAIN_ITERS=10" in out and f'DATA_PATH="1 {prefix}_text_document"' in out


def test_count_tokens_takes_neo_mmap_path(shapes: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": line}) + "\n" for line in synthetic.corpus()[:5]))
    assert main(["data", "preprocess", "--input", str(corpus), "--output-prefix", str(tmp_path / "c"),
                 "--tokenizer-model", str(shapes["tokenizer"]), "--no-progress"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["data", "count-tokens", "--mmap_path", str(tmp_path / "c_text_document.bin")]) == 0
    assert "5 documents, 5 sequences" in capsys.readouterr().out
    assert main(["data", "count-tokens", "c_text_document", "--mmap_path", "c_text_document"]) == 2
    assert "either as an argument or as --mmap_path, found both" in capsys.readouterr().err
    assert main(["data", "count-tokens"]) == 2
    assert "found neither" in capsys.readouterr().err


def test_mixture_help_documents_the_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["data", "mixture", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for text in ("global_batch_size: 1024", "GLOBAL_BATCH_SIZE: 1024", "SEQ_LEN: 8192", "1_ROUND:", "TRAIN_ITERS",
                 'DATA_PATH: "0.7 /data/web_text_document', "sets trainer.max_steps (TRAIN_ITERS)"):  # fmt: skip
        assert text in out, text
