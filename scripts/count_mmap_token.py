#!/usr/bin/env python3
"""Drop-in for NEO's ``tools/count_mmap_token.py --mmap_path PREFIX`` (a dataset prefix or its ``.bin``).

Prints NEO's two lines (``Counting tokens in  PATH`` and ``Total number of tokens:  N``, which NEO's
``parse_mixture.py`` reads from logs), then ``neva data count-tokens``' summary. The count is read from the
``.idx`` (no pass over the tokens). ``neva data mixture`` counts by itself; no table of counts needs keeping.
"""

from __future__ import annotations

import argparse
import sys

from neva_tools.cli import boundary

boundary.guard_startup()  # Ctrl-C while torch and megatron are imported: one line, exit 130
try:
    from neva_tools.cli.data import count_line
    from neva_tools.data.megatron_flags import parse_dropin, run_dropin
except KeyboardInterrupt:
    boundary.interrupted_while_starting()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mmap_path", required=True, help="the dataset prefix (my-corpus_text_document) or its .bin")
    args = parse_dropin(parser, sys.argv[1:] if argv is None else argv, "count_mmap_token.py")

    def body() -> None:
        from neva_tools.data.mmap import count_tokens

        print("Counting tokens in ", args.mmap_path)
        count = count_tokens(args.mmap_path)
        print("Total number of tokens: ", count.tokens)
        print(count_line(count))

    return run_dropin(body)


if __name__ == "__main__":
    sys.exit(main())
