#!/usr/bin/env python3
"""Drop-in for Megatron-LM's ``tools/preprocess_data.py`` (and NEO's copy of it).

Takes that tool's command line and calls ``neva data preprocess``: the same ``PREFIX_KEY_document.bin/.idx`` pair,
written atomically, every bad line named by file and line. Flags with nothing to do here (``--partitions``,
``--keep-sequential-samples``, ``--log-interval``, ...) are accepted with a note; the ones that cannot be honoured
(``--split-sentences``, BERT or tiktoken tokenizers, ...) are refused with the reason; unknown flags are an error
naming all of them. Existing outputs are replaced, as Megatron's tool does. See ``neva_tools.data.megatron_flags``.
"""

from __future__ import annotations

import argparse
import sys

from neva_tools.cli import boundary

boundary.guard_startup()  # Ctrl-C while torch and megatron are imported: one line, exit 130
try:
    from neva_tools.cli.data import preprocess_line
    from neva_tools.data.megatron_flags import (
        add_preprocess_flags,
        parse_dropin,
        preprocess_job,
        run_dropin,
        run_preprocess_job,
    )
except KeyboardInterrupt:
    boundary.interrupted_while_starting()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_preprocess_flags(parser, dropin=True)
    args = parse_dropin(parser, sys.argv[1:] if argv is None else argv, "preprocess_data.py")

    def body() -> None:
        for summary in run_preprocess_job(preprocess_job(args), overwrite=True):
            print(preprocess_line(summary))

    return run_dropin(body)


if __name__ == "__main__":
    sys.exit(main())
