#!/usr/bin/env python3
"""Drop-in for NeMo's ``scripts/checkpoint_converters/convert_llama_hf_to_nemo.py``.

Takes NeMo's flags; needs no YAML edits (``mcore_gpt`` and ``transformer_engine`` are set for you) and
streams the conversion (``neva convert hf-to-nemo``). Also converts Mistral and Qwen2 checkpoints.
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
    parser.add_argument("--input_name_or_path", required=True, help="HF model directory or hub repo id")
    parser.add_argument("--output_path", required=True, help="the .nemo file to write")
    parser.add_argument("--precision", default=None, help="16, bf16 or 32 (default: the checkpoint's dtype)")
    parser.add_argument("--tensor_model_parallel_size", type=int, default=1, help="TP to split for at conversion")

    def body(args: argparse.Namespace) -> None:
        summary = convert_hf_to_nemo(
            args.input_name_or_path,
            args.output_path,
            dtype=precision_dtype(args.precision),
            tp=args.tensor_model_parallel_size,
            overwrite=True,
        )
        print_summary(summary, as_json=False)

    return run_dropin(parser, body, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
