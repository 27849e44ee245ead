#!/usr/bin/env python3
"""Benchmark ``preprocess_jsonl`` against raw sentencepiece encoding of the same texts, in one run.

Generates ~50k synthetic JSONL lines (Zipf-distributed made-up words, 20–150 words a line), trains a
sentencepiece BPE tokenizer (vocab ~8000) on part of them with ``train_sentencepiece``, then measures
side by side, alternating, best of ``--repeats``:

- raw: a plain ``multiprocessing`` pool (spawn, tokenizer loaded once per worker) calling
  ``SentencePieceProcessor.encode`` on the texts already in memory, ``chunk_size`` texts per task;
- preprocess: ``preprocess_jsonl`` with the same number of workers and chunk size, from the JSONL
  file to the finished ``.bin/.idx`` (reading, JSON parsing, writing and the atomic rename included).

Both include starting their worker processes; megatron-core is imported before timing (a one-off cost
of the first call in a process, not of throughput). Prints one JSON object with samples/s of both and
the ratio preprocess/raw (target ≥ 0.8).
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_SP: Any = None


def _raw_init(model: str) -> None:
    global _SP
    import sentencepiece as spm

    _SP = spm.SentencePieceProcessor(model_file=model)


def _raw_encode(texts: list[str]) -> list[list[int]]:
    return [_SP.encode(text) for text in texts]


def raw_encode(texts: list[str], model: Path, workers: int, chunk_size: int) -> tuple[float, int]:
    """Seconds and token count of encoding ``texts`` with a plain spawned pool."""
    start = time.perf_counter()
    chunks = [texts[i : i + chunk_size] for i in range(0, len(texts), chunk_size)]
    tokens = 0
    with multiprocessing.get_context("spawn").Pool(workers, _raw_init, (str(model),)) as pool:
        for ids in pool.imap(_raw_encode, chunks):
            tokens += sum(map(len, ids))
    return time.perf_counter() - start, tokens


def synthetic_lines(n: int, seed: int = 0) -> list[str]:
    """``n`` lines of made-up words with a Zipf-like frequency, 20–150 words each, some punctuation."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"] + ["th", "qu", "ing", "er", "on"]
    words = sorted({"".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(12000)})
    rng.shuffle(words)
    cum_weights = list(itertools.accumulate(1 / (rank + 1) for rank in range(len(words))))
    lines = []
    for _ in range(n):
        sentence = rng.choices(words, cum_weights=cum_weights, k=rng.randint(20, 150))
        sentence[0] = sentence[0].capitalize()
        lines.append(" ".join(sentence) + rng.choice([".", "!", "?", ". 42", ", 2024."]))
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs of each")
    parser.add_argument("--workdir", type=Path, help="where to write (default: a temp dir)")
    args = parser.parse_args()

    import megatron.core.datasets.indexed_dataset  # noqa: F401  (imported once, before timing)

    from neva_tools.data.mmap import count_tokens, preprocess_jsonl
    from neva_tools.tokenizer.train import train_sentencepiece
    from neva_tools.utils.log import setup_logging

    setup_logging(-1, progress=False)
    work = Path(tempfile.mkdtemp(prefix="neva-bench-data-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        texts = synthetic_lines(args.lines)
        src = work / "corpus.jsonl"
        with open(src, "w", encoding="utf-8") as fh:
            for i, text in enumerate(texts):
                fh.write(json.dumps({"id": str(i), "text": text, "src": "synthetic"}) + "\n")
        generate_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        model = train_sentencepiece(texts[:10_000], work / "tokenizer.model", vocab_size=args.vocab)
        train_seconds = time.perf_counter() - t0

        raw_runs, pre_runs, raw_tokens, summary = [], [], 0, None
        for _ in range(args.repeats):
            seconds, raw_tokens = raw_encode(texts, model, args.workers, args.chunk_size)
            raw_runs.append(seconds)
            summary = preprocess_jsonl(
                src, work / "corpus", model, workers=args.workers, chunk_size=args.chunk_size, overwrite=True
            )
            pre_runs.append(summary.seconds)
        assert summary is not None
        if summary.tokens != raw_tokens or count_tokens(summary.prefix).tokens != raw_tokens:
            raise SystemExit(f"token counts differ: preprocess {summary.tokens}, raw {raw_tokens}")
        raw_rate = args.lines / min(raw_runs)
        pre_rate = args.lines / min(pre_runs)
        result = {
            "lines": args.lines,
            "input_bytes": summary.bytes_in,
            "tokens": summary.tokens,
            "vocab_size": args.vocab,
            "dtype": summary.dtype,
            "workers": args.workers,
            "chunk_size": args.chunk_size,
            "cpus": multiprocessing.cpu_count(),
            "raw_seconds": [round(s, 3) for s in raw_runs],
            "preprocess_seconds": [round(s, 3) for s in pre_runs],
            "raw_samples_per_s": round(raw_rate),
            "preprocess_samples_per_s": round(pre_rate),
            "preprocess_tokens_per_s": round(summary.tokens / min(pre_runs)),
            "ratio_preprocess_vs_raw": round(pre_rate / raw_rate, 3),
            "target": {"ratio_preprocess_vs_raw": ">= 0.8"},
            "setup_seconds": {"generate": round(generate_seconds, 2), "train_tokenizer": round(train_seconds, 2)},
        }
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
