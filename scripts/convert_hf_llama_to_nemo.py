#!/usr/bin/env python3
"""Drop-in for NeMo's older ``scripts/nlp_language_modeling/convert_hf_llama_to_nemo.py`` (``--in-file/--out-file``).

Unlike the original, it needs no edit of ``megatron_llama_config.yaml`` first and does not hold the
model in memory: it calls ``neva convert hf-to-nemo``.
"""

from __future__ import annotations

import argparse
import sys

from neva_tools.cli import boundary

boundary.guard_startup()  # Ctrl-C while torch and megatron are imported: one line, exit 130
try:
    from neva_tools.cli.convert import print_summary
    from neva_tools.convert.hf_to_nemo import convert_hf_to_nemo
    from neva_tools.convert.nemo_flags import precision_dtype, run_dropin
except KeyboardInterrupt:
    boundary.interrupted_while_starting()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--in-file", required=True, help="HF model directory or hub repo id")
    parser.add_argument("--out-file", required=True, help="the .nemo file to write")
    parser.add_argument("--precision", default=None, help="16, bf16 or 32 (default: the checkpoint's dtype)")

    def body(args: argparse.Namespace) -> None:
        summary = convert_hf_to_nemo(args.in_file, args.out_file, dtype=precision_dtype(args.precision), overwrite=True)
        print_summary(summary, as_json=False)

    return run_dropin(parser, body, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
