#!/usr/bin/env python3
"""The data check ``neva train`` runs before it builds the model (``neva_tools.train.data_check``), timed on a
synthetic LLaVA-665k-like dataset, printed as JSON.

``--records`` records (default 100,000) in one LLaVA JSON list: 90% with one image (a distinct PNG file each, 64 x 48
px, so every check stats its own file), 10% text-only, one to three rounds of vicuna_v1 text each; a 320-piece
sentencepiece tokenizer trained on the synthetic captions. Timed: the check as training runs it (``pad``: image files
stat-ed, every record tokenized; one process) and with AnyRes (``anyres`` + ``spatial_unpad``: every image's header
read for its size), each after one warm-up pass over the files (the page cache as a second run sees it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path


def make(root: Path, records: int) -> tuple[Path, Path, Path]:
    from PIL import Image

    from neva_tools.data import synthetic
    from neva_tools.tokenizer.train import train_sentencepiece

    images = root / "images"
    images.mkdir()
    buf = root / "one.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf)
    png = buf.read_bytes()
    rng = random.Random(0)
    words = " ".join(synthetic.corpus()).split()
    rows = []
    for i in range(records):
        turns = []
        for _ in range(rng.randint(1, 3)):
            q = " ".join(rng.choices(words, k=rng.randint(5, 20))) + "?"
            a = " ".join(rng.choices(words, k=rng.randint(10, 80))) + "."
            turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        row = {"id": f"r{i}", "conversations": turns}
        if i % 10:
            name = f"{i:06d}.png"
            (images / name).write_bytes(png)
            row["image"] = name
            turns[0]["value"] = "<image>\n" + turns[0]["value"]
        rows.append(row)
    data = root / "data.json"
    data.write_text(json.dumps(rows))
    tok = train_sentencepiece(synthetic.corpus(), root / "tok.model", vocab_size=320)
    return data, images, tok


def timed(data: Path, images: Path, tok: Path, *overrides: str, workers: int = 1) -> dict:
    from neva_tools.config.load import load_config
    from neva_tools.train.data_check import check_data

    cfg = load_config(None, [f"model.data.data_path={data}", f"model.data.image_folder={images}",
                             "model.mm_cfg.llm.model_type=vicuna_v1", "model.data.max_seq_length=4096",
                             *overrides])  # fmt: skip
    check_data(cfg, 336, 14, tok)  # warm-up: the page cache and the tokenizer
    start = time.perf_counter()
    report = check_data(cfg, 336, 14, tok, workers=workers)
    seconds = time.perf_counter() - start
    assert report.ok, report.by_kind()
    return {"records": report.records, "images": report.images, "workers": workers, "seconds": round(seconds, 2),
            "records_per_s": round(report.records / seconds), "tokens": report.length_stats()}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=100_000)
    args = parser.parse_args()
    from neva_tools.train.data_check import check_workers

    with tempfile.TemporaryDirectory(prefix="neva-bench-check-") as tmp:
        start = time.perf_counter()
        data, images, tok = make(Path(tmp), args.records)
        made = time.perf_counter() - start
        anyres = ["model.data.image_aspect_ratio=anyres", "model.data.image_grid_pinpoints=(1x1),...,(3x3)",
                  "model.mm_cfg.mm_patch_merge_type=spatial_unpad"]  # fmt: skip
        workers = check_workers([data])  # what neva train uses for this file on this machine
        result = {"dataset_mb": round(data.stat().st_size / 1e6, 1), "generate_s": round(made, 1),
                  "cpus": len(os.sched_getaffinity(0)), "pad": timed(data, images, tok),
                  "anyres": timed(data, images, tok, *anyres),
                  "pad_as_neva_train": timed(data, images, tok, workers=workers)}  # fmt: skip
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
