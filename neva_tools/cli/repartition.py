"""``neva repartition``: change the tensor/pipeline-parallel split of a ``.nemo``."""

from __future__ import annotations

import argparse

from neva_tools.cli.common import positive_int
from neva_tools.cli.convert import print_summary
from neva_tools.convert.repartition import repartition


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    """Add ``neva repartition``."""
    p = sub.add_parser(
        "repartition",
        parents=[parent],
        help="re-split a .nemo (GPT or NeVA) for another TP/PP size, streaming and bit-exact",
        description="Any TP/PP to any TP/PP, legacy (mp_rank_XX/) or dist (model_weights/) layouts in either "
        "direction, one tensor at a time. Replicated tensors are verified identical across ranks.",
    )
    p.add_argument("--input", required=True, help="the .nemo file (or extracted directory) to read")
    p.add_argument("--output", required=True, help="the .nemo file to write")
    p.add_argument("--tp", type=positive_int, required=True, help="target tensor-parallel size")
    p.add_argument("--pp", type=positive_int, default=1, help="target pipeline-parallel size (default 1)")
    p.add_argument("--format", choices=("legacy", "dist"), dest="fmt", help="output layout (default: the input's)")
    p.add_argument("--to-mcore-names", action="store_true", help="rename legacy NeMo names to megatron-core names")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``neva repartition``."""
    summary = repartition(
        args.input,
        args.output,
        tp=args.tp,
        pp=args.pp,
        fmt=args.fmt,
        to_mcore_names=args.to_mcore_names,
        overwrite=args.overwrite,
    )
    print_summary(summary, args.json)
    return 0
