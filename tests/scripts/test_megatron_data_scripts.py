"""The drop-ins ``scripts/preprocess_data.py`` and ``scripts/count_mmap_token.py`` with NEO's command lines.

The seed's commands run verbatim (``tools/`` → our ``scripts/``) from a directory outside the checkout, on the
seed's own two-line corpus plus captions, with a tiny sentencepiece model at ``neo/tokenizer.model``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from neva_tools.tokenizer.text import TextTokenizer

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
SEED_LINES = [  # NEO's README example, verbatim
    {"src": "www.nvidia.com", "text": "The quick brown fox", "type": "Eng", "id": "0", "title": "First Part"},
    {"src": "The Internet", "text": "jumps over the lazy dog", "type": "Eng", "id": "42", "title": "Second Part"},
]


def _run(cwd: Path, script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPTS / script), *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "NEVA_NO_PROGRESS": "1"})  # fmt: skip


@pytest.fixture
def neo_dir(tmp_path: Path, sp_model: Path, corpus: list[str]) -> Path:
    """A NEO user's directory: my-corpus.json (loose JSON, one document per line) and neo/tokenizer.model."""
    lines = [*SEED_LINES, *({"src": "captions", "text": t, "type": "Eng", "id": str(i)} for i, t in enumerate(corpus))]
    (tmp_path / "my-corpus.json").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (tmp_path / "neo").mkdir()
    shutil.copyfile(sp_model, tmp_path / "neo" / "tokenizer.model")
    return tmp_path


def test_neo_seed_commands_run_verbatim(neo_dir: Path, sp_model: Path, corpus: list[str]) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    pre = _run(neo_dir, "preprocess_data.py", "--input", "my-corpus.json", "--output-prefix", "my-corpus",
               "--tokenizer-model", "neo/tokenizer.model", "--tokenizer-type", "SentencePieceTokenizer",
               "--keep-sequential-samples", "--append-eod")  # fmt: skip
    assert pre.returncode == 0, pre.stderr
    assert "Wrote my-corpus_text_document.bin and my-corpus_text_document.idx" in pre.stdout
    tok = TextTokenizer(sp_model)
    texts = [line["text"] for line in SEED_LINES] + corpus
    expected = [[*tok.encode(t), tok.eos_id] for t in texts]
    ds = IndexedDataset(str(neo_dir / "my-corpus_text_document"))
    assert [ds[i].tolist() for i in range(len(ds))] == expected

    count = _run(neo_dir, "count_mmap_token.py", "--mmap_path", "my-corpus_text_document")
    assert count.returncode == 0, count.stderr
    total = sum(map(len, expected))
    # the two lines NEO's parse_mixture.py reads back from count logs
    assert re.search(r"Counting tokens in\s+(.*)", count.stdout).group(1) == "my-corpus_text_document"
    assert int(re.search(r"Total number of tokens:\s+(\d+)", count.stdout).group(1)) == total
    assert f"{len(texts):,} documents, {len(texts):,} sequences, {total:,} tokens" in count.stdout
    by_bin = _run(neo_dir, "count_mmap_token.py", "--mmap_path", str(neo_dir / "my-corpus_text_document.bin"))
    assert f"Total number of tokens:  {total}" in by_bin.stdout  # NEO's count_tokens.sh passes the .bin


def test_upstream_megatron_command_with_workers(neo_dir: Path, sp_model: Path) -> None:
    proc = _run(neo_dir, "preprocess_data.py", "--input", "my-corpus.json", "--output-prefix", "out/my-corpus",
                "--json-keys", "text", "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model",
                str(neo_dir / "neo" / "tokenizer.model"), "--append-eod", "--workers", "2", "--partitions", "2",
                "--log-interval", "1000")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "WARNING: ignoring --partitions 2" in proc.stderr and "ignoring --log-interval 1000" in proc.stderr
    assert (neo_dir / "out" / "my-corpus_text_document.idx").is_file()


def test_unknown_flags_are_one_error_naming_all(neo_dir: Path) -> None:
    proc = _run(neo_dir, "preprocess_data.py", "--input", "my-corpus.json", "--output-prefix", "x",
                "--tokenizer-model", "neo/tokenizer.model", "--no-such-flag", "3", "--another")  # fmt: skip
    assert proc.returncode == 2
    assert "ERROR: preprocess_data.py does not take --no-such-flag 3 --another" in proc.stderr
    assert not list(neo_dir.glob("x_*"))
    count = _run(neo_dir, "count_mmap_token.py", "--mmap_path", "x", "--verbose")
    assert count.returncode == 2 and "count_mmap_token.py does not take --verbose" in count.stderr


def test_refusals_and_missing_files_exit_2_with_the_reason(neo_dir: Path) -> None:
    proc = _run(neo_dir, "preprocess_data.py", "--input", "my-corpus.json", "--output-prefix", "x",
                "--tokenizer-model", "neo/tokenizer.model", "--split-sentences")  # fmt: skip
    assert proc.returncode == 2
    assert "ERROR: --split-sentences is not supported: documents are tokenized whole" in proc.stderr
    missing = _run(neo_dir, "count_mmap_token.py", "--mmap_path", "nothing_text_document")
    assert missing.returncode == 2
    assert "ERROR: no mmap dataset at prefix nothing_text_document" in missing.stderr


def test_help_lists_megatron_flags(neo_dir: Path) -> None:
    proc = _run(neo_dir, "preprocess_data.py", "--help")
    assert proc.returncode == 0
    for flag in ("--tokenizer-type", "--tokenizer-model", "--json-keys", "--keep-sequential-samples", "--workers"):
        assert flag in proc.stdout
