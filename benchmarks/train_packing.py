#!/usr/bin/env python3
"""Training throughput with and without sequence packing, on a realistic length mix, in one run.

The model is ``benchmarks/train.py``'s small NeVA (4-layer 256-hidden LLaMA-style LLM, 2-layer ViT, 64 image
tokens per image), all parts trainable, fp32 on the CPU. The data is ``--samples`` conversations, each with one
image, whose text lengths follow a lognormal mix (median ~110 tokens, long tail, capped so a sample fits a row).

- unpacked: micro-batches of ``--micro`` samples padded to their longest one (the usual collate);
- packed: first-fit-decreasing rows of ``--capacity`` expanded tokens (``PackedNevaDataset``'s planner and
  ``pack_sequences``), micro-batches of ``max(1, micro // samples-per-row)`` rows so a step sees about as many
  samples, with the block-diagonal attention mask ``llava_loss`` builds for packed rows.

Both go once over the same samples (training steps with ``llava_loss``, backward, AdamW), alternating one
pass each for ``--repeats`` passes; throughput counts *real* (non-padding) expanded tokens per second.
Prints one JSON object with both throughputs, their ratio and the padding fractions.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))


def make_samples(n: int, capacity: int, image_tokens: int, vocab: int) -> list[dict[str, Any]]:
    """``n`` shifted (input_ids, labels, image) samples with lognormal text lengths."""
    import torch

    from neva_tools.data.templates import IMAGE_TOKEN_INDEX

    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(n):
        text = min(capacity - image_tokens, max(16, int(rng.lognormvariate(4.7, 0.7))))
        ids = torch.randint(3, vocab, (text,), generator=g)
        ids[1] = IMAGE_TOKEN_INDEX
        labels = torch.randint(3, vocab, (text,), generator=g)
        labels[:2] = -100
        samples.append({"input_ids": ids, "labels": labels, "id": str(i),
                        "images": torch.randn(1, 3, 112, 112, generator=g)})  # fmt: skip
    return samples


def unpacked_batches(samples: list[dict[str, Any]], micro: int) -> list[dict[str, Any]]:
    from neva_tools.data.dataset import collate

    return [collate(samples[i : i + micro]) for i in range(0, len(samples), micro)]


def packed_batches(samples: list[dict[str, Any]], capacity: int, image_tokens: int, micro: int) -> list[dict]:
    import torch

    from neva_tools.data.dataset import collate
    from neva_tools.data.packing import first_fit_decreasing, pack_sequences

    lengths = [len(s["input_ids"]) + image_tokens - 1 for s in samples]
    plan = first_fit_decreasing(lengths, capacity)
    rows = []
    for members in plan.bins:
        packed = pack_sequences([(samples[i]["input_ids"], samples[i]["labels"]) for i in members])
        rows.append({"input_ids": packed.input_ids, "labels": packed.labels, "position_ids": packed.position_ids,
                     "cu_seqlens": packed.cu_seqlens, "id": "+".join(samples[i]["id"] for i in members),
                     "images": torch.cat([samples[i]["images"] for i in members])})  # fmt: skip
    per_row = len(samples) / len(rows)
    rows_per_batch = max(1, round(micro / per_row))
    return [collate(rows[i : i + rows_per_batch]) for i in range(0, len(rows), rows_per_batch)]


def real_tokens(batches: list[dict[str, Any]], image_tokens: int) -> tuple[int, int]:
    """(non-padding expanded tokens, computed expanded tokens incl. padding) over ``batches``."""
    from neva_tools.data.templates import IMAGE_TOKEN_INDEX

    real = computed = 0
    for b in batches:
        widths = (b["input_ids"] == IMAGE_TOKEN_INDEX).long() * (image_tokens - 1) + 1
        lengths = [int(widths[r, : _length(b, r)].sum()) for r in range(len(widths))]
        real += sum(lengths)
        computed += max(lengths) * len(lengths)
    return real, computed


def _length(b: dict[str, Any], row: int) -> int:
    cu = b["cu_seqlens"][row]
    if cu is not None:
        return int(cu[-1])
    return int((b["labels"][row] != -100).nonzero().max()) + 1 if (b["labels"][row] != -100).any() else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=48, help="samples per pass (default 48)")
    parser.add_argument("--micro", type=int, default=4, help="samples per unpacked micro-batch (default 4)")
    parser.add_argument("--capacity", type=int, default=512, help="packed row length in tokens (default 512)")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per mode (default 2)")
    args = parser.parse_args()

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import train as base

    from neva_tools.model.parallel import destroy_distributed, init_distributed
    from neva_tools.train.module import llava_loss
    from neva_tools.train.optim import OptimSettings, build_optimizer

    init_distributed(tp=1, seed=1234)
    try:
        model = base.build_ours()
        image_tokens = model.img_seq_len
        samples = make_samples(args.samples, args.capacity, image_tokens, base.VOCAB)
        modes = {"unpacked": unpacked_batches(samples, args.micro),
                 "packed": packed_batches(samples, args.capacity, image_tokens, args.micro)}  # fmt: skip
        optimizer = build_optimizer(model, OptimSettings(lr=1e-5))
        times: dict[str, list[float]] = {m: [] for m in modes}

        def one_pass(batches: list[dict[str, Any]]) -> float:
            start = time.perf_counter()
            for b in batches:
                optimizer.zero_grad()
                llava_loss(model, b)[0].backward()
                optimizer.step()
            return time.perf_counter() - start

        one_pass(modes["unpacked"][:1] + modes["packed"][:1])  # warm-up
        for _ in range(args.repeats):
            for name, batches in modes.items():
                times[name].append(one_pass(batches))
        result: dict[str, Any] = {
            "benchmark": "train_packing_tokens_per_second", "device": "cpu", "samples": args.samples,
            "image_tokens": image_tokens, "capacity": args.capacity,
        }  # fmt: skip
        for name, batches in modes.items():
            real, computed = real_tokens(batches, image_tokens)
            seconds = statistics.median(times[name])
            result[name] = {
                "steps": len(batches), "real_tokens": real, "padding_fraction": round(1 - real / computed, 3),
                "seconds_per_pass": round(seconds, 3), "real_tokens_per_second": round(real / seconds, 1),
            }  # fmt: skip
        result["ratio_packed_over_unpacked"] = round(
            result["packed"]["real_tokens_per_second"] / result["unpacked"]["real_tokens_per_second"], 3
        )
        print(json.dumps(result))
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
