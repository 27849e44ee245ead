#!/usr/bin/env python3
"""Data pipeline benchmark, in one run, printed as JSON:

- preprocessing throughput vs the raw tokenizer on the same texts and workers (``data_preprocess.py``;
  target ≥ 0.8×);
- packing fill ratio of first-fit-decreasing on a realistic (lognormal) length mix (target ≥ 0.97);
- images per second through ``NevaDataset`` + ``collate`` with a 2-worker ``DataLoader`` (336 px, pad
  mode), next to PIL decoding + resizing the same files in the main process (the floor of the work).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def packing_fill(n: int = 20000, capacity: int = 4096) -> dict:
    from neva_tools.data.packing import first_fit_decreasing

    rng = random.Random(0)
    lengths = [min(capacity, max(32, int(rng.lognormvariate(6.3, 0.8)))) for _ in range(n)]
    start = time.perf_counter()
    plan = first_fit_decreasing(lengths, capacity)
    return {"samples": n, "capacity": capacity, "bins": len(plan.bins), "fill_ratio": round(plan.fill_ratio, 4),
            "seconds": round(time.perf_counter() - start, 3), "target_fill_ratio": ">= 0.97"}  # fmt: skip


def images_per_second(work: Path, n: int = 240) -> dict:
    from PIL import Image
    from torch.utils.data import DataLoader

    from neva_tools.data import synthetic
    from neva_tools.data.dataset import NevaDataset, collate
    from neva_tools.data.images import ImageProcessor
    from neva_tools.data.registry import DatasetSpec, DatasetUse
    from neva_tools.tokenizer.train import train_sentencepiece

    paths = synthetic.make_dataset(work, train=n, heldout=0, size=512)
    tok = train_sentencepiece(synthetic.corpus(), work / "tok.model", vocab_size=320)
    use = DatasetUse(DatasetSpec("pre", paths["pretrain"], paths["images"], "plain"))
    ds = NevaDataset([use], tok, ImageProcessor(image_size=336, aspect="pad"), image_tokens=576)
    loader = DataLoader(ds, batch_size=16, num_workers=2, collate_fn=collate)
    start = time.perf_counter()
    images = sum(len(batch["images"]) for batch in loader)
    dataset_seconds = time.perf_counter() - start
    files = sorted(paths["images"].iterdir())
    start = time.perf_counter()
    for f in files:
        with Image.open(f) as img:
            img.convert("RGB").resize((336, 336), Image.Resampling.BICUBIC)
    pil_seconds = time.perf_counter() - start
    return {"images": images, "dataset_2_workers_images_per_s": round(images / dataset_seconds, 1),
            "pil_decode_resize_1_process_images_per_s": round(len(files) / pil_seconds, 1)}  # fmt: skip


def main() -> int:
    here = Path(__file__).parent
    pre = subprocess.run([sys.executable, str(here / "data_preprocess.py")], capture_output=True, text=True, check=True)
    with tempfile.TemporaryDirectory(prefix="neva-bench-data-") as tmp:
        result = {
            "preprocess": json.loads(pre.stdout),
            "packing": packing_fill(),
            "dataset": images_per_second(Path(tmp)),
        }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
