"""Entry point of the ``neva`` console command."""

from __future__ import annotations

from neva_tools.cli import boundary

boundary.arm_import_interrupt()  # tests only: SIGINT while a chosen module is imported
boundary.catch_interrupts()  # Ctrl-C while torch and megatron are imported (seconds): one line, exit status 130
try:
    from neva_tools.utils.log import install_noise_filters, setup_logging

    install_noise_filters()  # before the subcommands import torch and megatron: some of their notices come at import

    import argparse
    import gc
    import sys
    from collections.abc import Sequence

    from neva_tools import __version__
    from neva_tools.cli import (
        common,
        config,
        convert,
        data,
        export,
        generate,
        importer,
        plan,
        repartition,
        tokenizer,
        train,
    )
    from neva_tools.cli import eval as eval_cmd
    from neva_tools.utils.resources import return_freed_memory_to_os
except KeyboardInterrupt:
    boundary.interrupted_while_starting()

#: Subcommand modules, each with ``register(subparsers, parent)``.
SUBCOMMANDS = (tokenizer, convert, repartition, data, train, config, plan, generate, eval_cmd, export, importer)


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
    """Parse ``argv``, run the subcommand and return the exit status: 2 for the user's errors (a bad input, a full
    disk: one line, see ``neva_tools.cli.boundary``), 130 after Ctrl-C, 1 with a traceback for a bug."""
    parsed: list[argparse.Namespace] = []

    def command() -> int:
        args = build_parser().parse_args(argv)
        parsed.append(args)
        verbosity = common.merge_output_flags(args)
        gc.freeze()  # the import-time objects (torch, transformers) are never freed: keep them out of every collection
        setup_logging(verbosity, progress=not args.no_progress)
        return_freed_memory_to_os()
        return int(args.func(args) or 0)

    boundary.catch_interrupts()
    boundary.command_started()
    # console: the process ends after this call, and Ctrl-C during its exit (threads, atexit) is handled there too
    return boundary.run(command, lambda: parsed[0] if parsed else None, console=argv is None)


if __name__ == "__main__":
    sys.exit(main())
