#!/usr/bin/env python3
"""Benchmark ``neva convert hf-to-nemo`` against ``cp`` of the same safetensors bytes, in one run.

Generates (or takes with ``--model``) a LLaMA-shaped safetensors checkpoint (default: TinyLlama-1.1B
shapes, bf16, about 2.2 GB), then measures side by side: ``cp`` of the weight files, the conversion
(in a subprocess, peak RSS from its own ``ru_maxrss``), and the interpreter baseline (the same imports,
no work). This process imports nothing heavy, because Linux carries ``ru_maxrss`` over fork and exec.
Prints one JSON object with the figures and the ratios the targets are stated in:
wall ≤ 3× cp; peak RSS ≤ 1.5× the largest output shard + baseline.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from common import SHAPES, baseline_rss, copy_seconds, generate_in_child, timed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, help="an existing HF LLaMA directory (default: generate one)")
    parser.add_argument("--workdir", type=Path, help="where to generate and write (default: a temp dir)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--layers", type=int, default=SHAPES["layers"], help="fewer layers for a quick run")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="neva-bench-", dir=args.workdir))
    try:
        model = args.model or generate_in_child(work / "hf", args.layers)
        weights = sorted(model.glob("*.safetensors"))
        src_bytes = sum(f.stat().st_size for f in weights)
        cp_before = copy_seconds(weights, work / "cp")
        out = work / "model.nemo"
        neva = [sys.executable, "-m", "neva_tools"]
        convert_seconds, stdout = timed([*neva, "convert", "hf-to-nemo", "--input", str(model), "--output", str(out),
                                         "--tp", str(args.tp), "--json", "--no-progress", "-q"])  # fmt: skip
        summary = json.loads(stdout.strip().splitlines()[-1])
        cp_seconds = (cp_before + copy_seconds(weights, work / "cp")) / 2  # cp before and after, averaged
        cp_durable = copy_seconds(weights, work / "cp", durable=True)
        baseline = baseline_rss("neva_tools.cli.main, neva_tools.convert.hf_to_nemo, torch, safetensors")
        largest_shard = src_bytes // args.tp  # one rank's weights (bf16 in, bf16 out)
        result = {
            "model_bytes": src_bytes,
            "tp": args.tp,
            "cp_seconds": round(cp_seconds, 3),
            "convert_seconds": round(convert_seconds, 3),
            "convert_in_process_seconds": round(summary["seconds"], 3),
            "wall_ratio_vs_cp": round(convert_seconds / cp_seconds, 2),
            "cp_fsync_seconds": round(cp_durable, 3),
            "wall_ratio_vs_cp_fsync": round(convert_seconds / cp_durable, 2),
            "peak_rss_bytes": summary["peak_rss"],
            "baseline_rss_bytes": baseline,
            "largest_output_shard_bytes": largest_shard,
            "rss_over_baseline_vs_shard": round((summary["peak_rss"] - baseline) / largest_shard, 3),
            "output_bytes": out.stat().st_size,
            "output_vs_input_bytes": round(out.stat().st_size / src_bytes, 4),
            "targets": {"wall_ratio_vs_cp": "<= 3", "rss_over_baseline_vs_shard": "<= 1.5"},
        }
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
