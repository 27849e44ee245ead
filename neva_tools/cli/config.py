"""``neva config``: show the merged training config, or validate it before a GPU hour is spent."""

from __future__ import annotations

import argparse

from neva_tools.cli.common import positive_int


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    """Add ``neva config show`` and ``neva config validate``."""
    p = sub.add_parser("config", help="show or validate a training config", parents=[parent])
    csub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    for name, func, help_text in (("show", run_show, "print the merged config (base → recipe → overrides)"),
                                  ("validate", run_validate, "check a config: exit 0 valid, 1 problems listed, 2 the "
                                   "config cannot be loaded (unknown keys, refused values)")):  # fmt: skip
        a = csub.add_parser(name, parents=[parent], help=help_text)
        a.add_argument("config", nargs="?", help="recipe YAML overriding conf/neva_config.yaml")
        a.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
        if name == "validate":
            a.add_argument("--offline", action="store_true", help="skip the checks that read the referenced files")
            a.add_argument("--devices", type=positive_int, metavar="N",
                           help="processes per node (scripts/train.sh N): global batch vs micro × DP "
                                "(default: trainer.devices when set)")  # fmt: skip
        a.set_defaults(func=func)


def _load(args: argparse.Namespace):
    from neva_tools.config.load import load_config

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:
        config, overrides = None, [config, *overrides]
    return load_config(config, overrides)


def run_show(args: argparse.Namespace) -> int:
    """``neva config show``."""
    from omegaconf import OmegaConf

    print(OmegaConf.to_yaml(_load(args)), end="")
    return 0


def run_validate(args: argparse.Namespace) -> int:
    """``neva config validate``."""
    from neva_tools.train.validate import advisories, check_config

    cfg = _load(args)
    problems = check_config(cfg, offline=args.offline, devices=args.devices)
    for note in advisories(cfg):
        print(f"note: {note}")
    for problem in problems:
        print(f"problem: {problem}")
    print("OK: the config is valid" if not problems else f"FAILED: {len(problems)} problems")
    return 1 if problems else 0
