"""Entry point of the ``neva`` console command."""

from __future__ import annotations

from neva_tools.utils.log import first_to_report, install_noise_filters, setup_logging

install_noise_filters()  # before the subcommands import torch and megatron: some of their notices come at import

import argparse  # noqa: E402
import gc  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402

from neva_tools import __version__  # noqa: E402
from neva_tools.cli import (  # noqa: E402
    common,
    config,
    convert,
    data,
    export,
    generate,
    importer,
    repartition,
    tokenizer,
    train,
)
from neva_tools.cli import eval as eval_cmd  # noqa: E402
from neva_tools.errors import NevaError  # noqa: E402
from neva_tools.utils.resources import return_freed_memory_to_os  # noqa: E402

#: Subcommand modules, each with ``register(subparsers, parent)``.
SUBCOMMANDS = (tokenizer, convert, repartition, data, train, config, generate, eval_cmd, export, importer)


def build_parser() -> argparse.ArgumentParser:
    """The full ``neva`` argument parser."""
    parser = common.Parser(
        prog="neva",
        description="NeVA Recipes: train LLaVA-style vision-language models with megatron-core.",
        epilog="Run 'neva COMMAND --help' for a command's options. The output options go before or after COMMAND.",
    )
    parser.add_argument("--version", action="version", version=f"neva {__version__}")
    common.add_output_flags(parser, top_level=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parent = common.common_parser()
    for module in SUBCOMMANDS:
        module.register(sub, parent)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the subcommand and return the exit status (2 for user errors)."""
    args = build_parser().parse_args(argv)
    verbosity = common.merge_output_flags(args)
    gc.freeze()  # the import-time objects (torch, transformers) are never freed: keep them out of every collection
    setup_logging(verbosity, progress=not args.no_progress)
    return_freed_memory_to_os()
    try:
        return int(args.func(args) or 0)
    except NevaError as exc:
        if first_to_report():  # once per job, not once per rank
            print(f"neva: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if first_to_report("interrupt", wait_s=0):
            print("neva: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
