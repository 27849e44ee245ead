#!/usr/bin/env python3
"""Drop-in for NeMo's ``examples/nlp/language_modeling/megatron_change_num_partitions.py``.

Takes NeMo's flags and calls ``neva repartition``: streaming (never the whole model in memory), works on
megatron-core dist checkpoints (NeMo issue 7607) and legacy files alike. The source TP/PP is read from
the file; when given, ``--tensor_model_parallel_size``/``--pipeline_model_parallel_size`` must match it.
``--model_class`` and ``--tp_conversion_only`` are accepted and need nothing (only weights are moved).
"""

from __future__ import annotations

import argparse
import sys

from neva_tools.cli import boundary

boundary.guard_startup()  # Ctrl-C while torch and megatron are imported: one line, exit 130
try:
    from neva_tools.checkpoint.nemo_archive import NemoArchive
    from neva_tools.cli.convert import print_summary
    from neva_tools.convert.nemo_flags import run_dropin
    from neva_tools.convert.repartition import repartition
    from neva_tools.errors import NevaError
except KeyboardInterrupt:
    boundary.interrupted_while_starting()


def _check_source(path: str, tp: int | None, pp: int | None) -> None:
    with NemoArchive(path) as archive:
        if archive.layout != "legacy":
            return  # dist checkpoints are not tied to a TP/PP
        found_tp, found_pp = archive.legacy_ranks()
    for flag, given, found in (("tensor", tp, found_tp), ("pipeline", pp, found_pp)):
        if given is not None and given != found:
            raise NevaError(f"--{flag}_model_parallel_size is {given} but {path} is stored with {found}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model_file", required=True, help="the .nemo to read")
    parser.add_argument("--target_file", required=True, help="the .nemo to write")
    parser.add_argument("--tensor_model_parallel_size", type=int, help="source TP (checked against the file)")
    parser.add_argument("--target_tensor_model_parallel_size", type=int, required=True)
    parser.add_argument("--pipeline_model_parallel_size", type=int, help="source PP (checked against the file)")
    parser.add_argument("--target_pipeline_model_parallel_size", type=int, default=1)
    parser.add_argument("--tp_conversion_only", action="store_true", help="accepted; only weights are moved anyway")
    parser.add_argument("--model_class", help="accepted and not needed")
    parser.add_argument("--tokenizer_model_path", help="a sentencepiece model to store instead of the archive's")

    def body(args: argparse.Namespace) -> None:
        _check_source(args.model_file, args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
        summary = repartition(
            args.model_file,
            args.target_file,
            tp=args.target_tensor_model_parallel_size,
            pp=args.target_pipeline_model_parallel_size,
            tokenizer_model=args.tokenizer_model_path,
            overwrite=True,
        )
        print_summary(summary, as_json=False)

    return run_dropin(parser, body, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
