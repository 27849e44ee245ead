"""Megatron-LM's tools/preprocess_data.py flags on ``neva data preprocess``: mapped, noted or refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from neva_tools.cli.main import main
from neva_tools.tokenizer.text import TextTokenizer


def _corpus(path: Path, texts: list[str]) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for i, text in enumerate(texts):
            fh.write(json.dumps({"src": "test", "text": text, "title": f"title {i}", "id": str(i)}) + "\n")
    return path


def _documents(prefix: Path) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))]


def _preprocess(*args: str) -> int:
    return main(["data", "preprocess", "--no-progress", *args])


@pytest.fixture
def texts(corpus: list[str]) -> list[str]:
    return corpus[:40]


def test_megatron_flags_write_the_same_files_as_ours(tmp_path: Path, sp_model: Path, texts: list[str]) -> None:
    src = _corpus(tmp_path / "c.jsonl", texts)
    assert _preprocess("--input", str(src), "--output-prefix", str(tmp_path / "ours"), "--tokenizer", str(sp_model),
                       "--append-eod") == 0  # fmt: skip
    assert _preprocess("--input", str(src), "--output-prefix", str(tmp_path / "meg"), "--tokenizer-model",
                       str(sp_model), "--tokenizer-type", "GPTSentencePieceTokenizer", "--append-eod", "--workers", "1",
                       "--keep-sequential-samples", "--partitions", "4", "--log-interval", "10", "--dataset-impl",
                       "mmap") == 0  # fmt: skip
    for ext in (".bin", ".idx"):
        ours, meg = tmp_path / f"ours_text_document{ext}", tmp_path / f"meg_text_document{ext}"
        assert meg.read_bytes() == ours.read_bytes()
    tok = TextTokenizer(sp_model)
    assert _documents(tmp_path / "meg_text_document") == [[*tok.encode(t), tok.eos_id] for t in texts]


def test_json_keys_write_one_pair_per_key(tmp_path: Path, sp_model: Path, texts: list[str]) -> None:
    src = _corpus(tmp_path / "c.jsonl", texts)
    assert _preprocess("--input", str(src), "--output-prefix", str(tmp_path / "c"), "--tokenizer-model",
                       str(sp_model), "--json-keys", "text", "title") == 0  # fmt: skip
    tok = TextTokenizer(sp_model)
    assert _documents(tmp_path / "c_text_document") == [tok.encode(t) for t in texts]
    assert _documents(tmp_path / "c_title_document") == [tok.encode(f"title {i}") for i in range(len(texts))]


def test_gpt2_bpe_vocab_and_merge_files(tmp_path: Path, texts: list[str]) -> None:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Tokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=300, special_tokens=["<|endoftext|>"])
    bpe.save_model(str(tmp_path), "gpt2")  # gpt2-vocab.json, gpt2-merges.txt, as Megatron's README names them
    src = _corpus(tmp_path / "c.jsonl", texts)
    assert _preprocess("--input", str(src), "--output-prefix", str(tmp_path / "c"), "--tokenizer-type",
                       "GPT2BPETokenizer", "--vocab-file", str(tmp_path / "gpt2-vocab.json"), "--merge-file",
                       str(tmp_path / "gpt2-merges.txt"), "--append-eod") == 0  # fmt: skip
    gpt2 = GPT2Tokenizer(vocab=str(tmp_path / "gpt2-vocab.json"), merges=str(tmp_path / "gpt2-merges.txt"))
    eod = gpt2.convert_tokens_to_ids("<|endoftext|>")
    assert _documents(tmp_path / "c_text_document") == [[*bpe.encode(t).ids, eod] for t in texts]


def test_input_glob_reads_the_files_in_order(tmp_path: Path, sp_model: Path, texts: list[str]) -> None:
    _corpus(tmp_path / "part_1.jsonl", texts[10:])
    _corpus(tmp_path / "part_0.jsonl", texts[:10])
    assert _preprocess("--input", str(tmp_path / "part_*.jsonl"), "--output-prefix", str(tmp_path / "c"),
                       "--tokenizer-model", str(sp_model)) == 0  # fmt: skip
    tok = TextTokenizer(sp_model)
    assert _documents(tmp_path / "c_text_document") == [tok.encode(t) for t in texts]


def test_flags_with_nothing_to_do_are_noted(tmp_path: Path, sp_model: Path, texts: list[str],
                                           capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    src = _corpus(tmp_path / "c.jsonl", texts)
    assert _preprocess("--input", str(src), "--output-prefix", str(tmp_path / "c"), "--tokenizer-model",
                       str(sp_model), "--tokenizer-type", "SentencePieceTokenizer", "--append-eod",
                       "--keep-sequential-samples", "--partitions", "2", "--lang", "english",
                       "--keep-newlines") == 0  # fmt: skip
    err = capsys.readouterr().err  # the CLI logs to stderr
    assert "INFO: --keep-sequential-samples: documents always keep the input order" in err
    assert "WARNING: ignoring --partitions 2: one pass writes the single pair" in err
    assert "WARNING: ignoring --lang english: it only applies with --split-sentences" in err
    assert "WARNING: ignoring --keep-newlines: it only applies with --split-sentences" in err
    assert "Megatron would append its own <EOD> id" in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--split-sentences"], r"--split-sentences is not supported: documents are tokenized whole"),
        (["--find-optimal-num-workers"], r"--find-optimal-num-workers is not supported: .*choose --workers"),
        (["--vocab-extra-ids", "100"], r"--vocab-extra-ids 100 is not supported: T5 sentinel"),
        (["--dataset-impl", "lazy"], r"--dataset-impl lazy is not supported: only the mmap format"),
        (["--tokenizer-type", "BertWordPieceLowerCase"], r"--tokenizer-type BertWordPieceLowerCase is not supported"),
        (["--tokenizer-type", "TikTokenizer"], r"--tokenizer-type TikTokenizer is not supported; use one of"),
        (["--tokenizer-type", "HuggingFaceTokenizer"], r"HuggingFaceTokenizer needs a Hugging Face tokenizer dir"),
        (["--tokenizer", "SP"], r"--tokenizer .* and --tokenizer-model .* both name a tokenizer"),
        (["--json-key", "text", "--json-keys", "title"], r"--json-key text and --json-keys title disagree"),
    ],
)
def test_flags_that_cannot_be_honoured_are_refused(tmp_path: Path, sp_model: Path, texts: list[str],
                                                   flags: list[str], message: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    import re

    src = _corpus(tmp_path / "c.jsonl", texts)
    flags = [str(sp_model) if f == "SP" else f for f in flags]
    status = _preprocess("--input", str(src), "--output-prefix", str(tmp_path / "c"), "--tokenizer-model",
                         str(sp_model), *flags)  # fmt: skip
    assert status == 2
    assert re.search(message, capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]


def test_tokenizer_errors_name_the_flags(tmp_path: Path, sp_model: Path, hf_tokenizer_dir: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    src = _corpus(tmp_path / "c.jsonl", ["a b c"])
    base = ["--input", str(src), "--output-prefix", str(tmp_path / "c")]
    assert _preprocess(*base, "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", str(hf_tokenizer_dir)) == 2
    assert "--tokenizer-type Llama2Tokenizer needs a sentencepiece .model file" in capsys.readouterr().err
    assert _preprocess(*base, "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(src)) == 2
    assert "takes --vocab-file VOCAB.json and --merge-file MERGES.txt" in capsys.readouterr().err
    assert _preprocess(*base) == 2
    assert "no tokenizer given: pass --tokenizer-model" in capsys.readouterr().err
    assert _preprocess(*base, "--tokenizer-model", str(tmp_path / "none.model")) == 2
    assert f"tokenizer {tmp_path / 'none.model'} does not exist" in capsys.readouterr().err
    assert _preprocess(*base, "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(hf_tokenizer_dir),
                       "--append-eod") == 0  # fmt: skip


def test_unknown_flags_are_one_error_listing_all(tmp_path: Path, sp_model: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        _preprocess("--input", "x.jsonl", "--output-prefix", "x", "--tokenizer-model", str(sp_model), "--foo", "1",
                    "--bar")  # fmt: skip
    assert exc.value.code == 2
    assert "unrecognized arguments: --foo 1 --bar" in capsys.readouterr().err
