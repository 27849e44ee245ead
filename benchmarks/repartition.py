#!/usr/bin/env python3
"""Benchmark ``neva repartition`` TP1 → TP4 against ``cp`` of the same ``.nemo`` bytes, in one run.

Generates a LLaMA-shaped checkpoint (TinyLlama-1.1B shapes, bf16, about 2.2 GB), converts it to a
TP=1 ``.nemo``, then measures side by side: ``cp`` of that ``.nemo``, the repartitioning (in a
subprocess, peak RSS from its own ``ru_maxrss``) and the interpreter baseline. Prints JSON with the
ratios the targets are stated in: wall ≤ 3× cp; peak RSS ≤ 1.5× the largest output shard + baseline.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from common import SHAPES, baseline_rss, copy_seconds, generate_in_child, timed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, help="where to generate and write (default: a temp dir)")
    parser.add_argument("--tp", type=int, default=4, help="target TP (default 4)")
    parser.add_argument("--layers", type=int, default=SHAPES["layers"], help="fewer layers for a quick run")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="neva-bench-", dir=args.workdir))
    neva = [sys.executable, "-m", "neva_tools"]
    try:
        hf = generate_in_child(work / "hf", args.layers)
        source = work / "tp1.nemo"
        timed([*neva, "convert", "hf-to-nemo", "--input", str(hf), "--output", str(source), "--no-progress", "-q"])
        shutil.rmtree(hf)
        out = work / f"tp{args.tp}.nemo"
        cp_before = copy_seconds(source, work / "copy.nemo")
        seconds, stdout = timed([*neva, "repartition", "--input", str(source), "--output", str(out),
                                 "--tp", str(args.tp), "--json", "--no-progress", "-q"])  # fmt: skip
        cp_seconds = (cp_before + copy_seconds(source, work / "copy.nemo")) / 2  # cp before and after, averaged
        cp_durable = copy_seconds(source, work / "copy.nemo", durable=True)
        summary = json.loads(stdout.strip().splitlines()[-1])
        baseline = baseline_rss("neva_tools.cli.main, neva_tools.convert.repartition, torch")
        with tarfile.open(out) as tar:
            largest = max(m.size for m in tar.getmembers() if m.name.endswith(".ckpt"))
        result = {
            "source_bytes": source.stat().st_size,
            "tp": args.tp,
            "cp_seconds": round(cp_seconds, 3),
            "repartition_seconds": round(seconds, 3),
            "repartition_in_process_seconds": round(summary["seconds"], 3),
            "wall_ratio_vs_cp": round(seconds / cp_seconds, 2),
            "cp_fsync_seconds": round(cp_durable, 3),
            "wall_ratio_vs_cp_fsync": round(seconds / cp_durable, 2),
            "peak_rss_bytes": summary["peak_rss"],
            "baseline_rss_bytes": baseline,
            "largest_output_shard_bytes": largest,
            "rss_over_baseline_vs_shard": round((summary["peak_rss"] - baseline) / largest, 3),
            "targets": {"wall_ratio_vs_cp": "<= 3", "rss_over_baseline_vs_shard": "<= 1.5"},
        }
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
