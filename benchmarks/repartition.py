#!/usr/bin/env python3
"""Benchmark ``neva repartition`` TP1 → TP4 against ``cp`` of the same ``.nemo`` bytes, in one run.

Generates a LLaMA-shaped checkpoint (TinyLlama-1.1B shapes, bf16, about 2.2 GB) and converts it to a
TP=1 ``.nemo``, then measures side by side, ``--runs`` times interleaved: ``cp`` of that ``.nemo``,
``cp`` followed by ``sync`` of the copy (the tool fsyncs its output before renaming it, so this is the
like-for-like reference), and the repartitioning as a user runs it (a fresh ``python -m neva_tools``
process, start-up included; peak RSS from its own ``ru_maxrss``), plus the interpreter baseline.
Prints JSON with the medians, every sample and the ratios the targets are stated in: wall ≤ 3× cp (of
the same bytes, both made durable); peak RSS ≤ 1.5× the largest output shard + baseline.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from common import SHAPES, against_cp, generate_in_child, timed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="where to generate and write (default: a temp dir)")
    parser.add_argument("--tp", type=int, default=4, help="target TP (default 4)")
    parser.add_argument("--layers", type=int, default=SHAPES["layers"], help="fewer layers for a quick run")
    parser.add_argument("--runs", type=int, default=3, help="interleaved repetitions (medians reported)")
    parser.add_argument("--cold", action="store_true", help="evict the inputs from the page cache before every step")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="neva-bench-", dir=args.workdir))
    neva = [sys.executable, "-m", "neva_tools"]
    try:
        hf = generate_in_child(work / "hf", args.layers)
        source = work / "tp1.nemo"
        timed([*neva, "convert", "hf-to-nemo", "--input", str(hf), "--output", str(source), "--no-progress", "-q"])
        shutil.rmtree(hf)
        out = work / f"tp{args.tp}.nemo"
        cmd = [*neva, "repartition", "--input", str(source), "--output", str(out), "--tp", str(args.tp), "--json",
               "--no-progress", "-q"]  # fmt: skip
        timing = against_cp("repartition", cmd, [source], out, work / "copy", runs=args.runs, cold=args.cold,
                            baseline_modules="neva_tools.cli.main, neva_tools.convert.repartition, torch")  # fmt: skip
        result = {
            "source_bytes": source.stat().st_size,
            "tp": args.tp,
            "runs": args.runs,
            "page_cache": "cold" if args.cold else "warm",
            **timing,
        }
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
