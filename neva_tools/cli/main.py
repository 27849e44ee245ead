"""Entry point of the ``neva`` console command."""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Sequence

from neva_tools import __version__
from neva_tools.cli import common, config, convert, data, export, generate, importer, repartition, tokenizer, train
from neva_tools.cli import eval as eval_cmd
from neva_tools.errors import NevaError
from neva_tools.utils.log import setup_logging
from neva_tools.utils.resources import return_freed_memory_to_os

#: Subcommand modules, each with ``register(subparsers, parent)``.
SUBCOMMANDS = (tokenizer, convert, repartition, data, train, config, generate, eval_cmd, export, importer)


def build_parser() -> argparse.ArgumentParser:
    """The full ``neva`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="neva",
        description="NeVA Recipes: train LLaVA-style vision-language models with megatron-core.",
        epilog="Run 'neva COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"neva {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parent = common.common_parser()
    for module in SUBCOMMANDS:
        module.register(sub, parent)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the subcommand and return the exit status (2 for user errors)."""
    args = build_parser().parse_args(argv)
    gc.freeze()  # the import-time objects (torch, transformers) are never freed: keep them out of every collection
    setup_logging(args.verbose - args.quiet, progress=not args.no_progress)
    return_freed_memory_to_os()
    try:
        return int(args.func(args) or 0)
    except NevaError as exc:
        print(f"neva: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("neva: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
