#!/usr/bin/env python3
"""Drop-in for NeMo's ``scripts/tokenizers/add_special_tokens_to_sentencepiece.py``.

Accepts NeMo's flags and keeps its defaults (tokens are ``control`` pieces unless ``--is_userdefined``;
an existing sentencepiece model at the output is replaced, any other file is refused), but needs no ``protoc``
run and calls the same code as ``neva tokenizer add-tokens``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from neva_tools.cli import boundary

boundary.guard_startup()  # Ctrl-C while torch and megatron are imported: one line, exit 130
try:
    from neva_tools.cli.tokenizer import report_lines
    from neva_tools.tokenizer.add_tokens import add_tokens
    from neva_tools.tokenizer.tokens import resolve_tokens
except KeyboardInterrupt:
    boundary.interrupted_while_starting()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--input_file", required=True, help="path to the sentencepiece model file")
    parser.add_argument("--output_file", required=True, help="path to the new sentencepiece model file")
    parser.add_argument("--tokens", nargs="+", required=True, help="special tokens to add")
    parser.add_argument(
        "--is_userdefined", action="store_true", help="add the tokens as user_defined pieces (default: control)"
    )
    args = parser.parse_args(argv)
    piece_type = "user_defined" if args.is_userdefined else "control"

    def body() -> None:
        tokens = resolve_tokens(args.tokens, None)
        same = Path(args.input_file).resolve() == Path(args.output_file).resolve()
        report = add_tokens(args.input_file, args.output_file, tokens, piece_type, in_place=same, overwrite=True)
        for line in report_lines(report):
            print(f"INFO: {line}")

    return boundary.run_dropin(body, lambda: args)


if __name__ == "__main__":
    sys.exit(main())
