#!/usr/bin/env python3
"""Benchmark ``neva convert hf-to-nemo`` against ``cp`` of the same safetensors bytes, in one run.

Generates (or takes with ``--model``) a LLaMA-shaped safetensors checkpoint (default: TinyLlama-1.1B
shapes, bf16, about 2.2 GB), then measures side by side, ``--runs`` times interleaved: ``cp`` of the
weight files, ``cp`` followed by ``sync`` of the copies (the tool fsyncs its output before renaming it,
so this is the like-for-like reference), and the conversion as a user runs it (a fresh ``python -m
neva_tools`` process: interpreter and import start-up included; peak RSS from its own ``ru_maxrss``).
The interpreter baseline is the same imports with no work. This process imports nothing heavy,
because Linux carries ``ru_maxrss`` over fork and exec. Prints one JSON object with the medians, every
sample and the ratios the targets are stated in: wall ≤ 3× cp (of the same bytes, both made durable);
peak RSS ≤ 1.5× the largest output shard + baseline.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from common import SHAPES, against_cp, generate_in_child


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="an existing HF LLaMA directory (default: generate one)")
    parser.add_argument("--workdir", type=Path, help="where to generate and write (default: a temp dir)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--layers", type=int, default=SHAPES["layers"], help="fewer layers for a quick run")
    parser.add_argument("--runs", type=int, default=3, help="interleaved repetitions (medians reported)")
    parser.add_argument("--cold", action="store_true", help="evict the inputs from the page cache before every step")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="neva-bench-", dir=args.workdir))
    try:
        model = args.model or generate_in_child(work / "hf", args.layers)
        weights = sorted(model.glob("*.safetensors"))
        src_bytes = sum(f.stat().st_size for f in weights)
        out = work / "model.nemo"
        cmd = [sys.executable, "-m", "neva_tools", "convert", "hf-to-nemo", "--input", str(model), "--output",
               str(out), "--tp", str(args.tp), "--json", "--no-progress", "-q"]  # fmt: skip
        modules = "neva_tools.cli.main, neva_tools.convert.hf_to_nemo, torch, safetensors"
        timing = against_cp("convert", cmd, weights, out, work / "cp", runs=args.runs, cold=args.cold,
                            baseline_modules=modules)  # fmt: skip
        result = {
            "model_bytes": src_bytes,
            "tp": args.tp,
            "runs": args.runs,
            "page_cache": "cold" if args.cold else "warm",
            **timing,
            "output_bytes": out.stat().st_size,
            "output_vs_input_bytes": round(out.stat().st_size / src_bytes, 4),
        }
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
