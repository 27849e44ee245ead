"""``neva config``: show the merged training config, or validate it before a GPU hour is spent."""

from __future__ import annotations

import argparse
from typing import Any

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
            a.add_argument("--plan", action="store_true", help="also print neva plan's per-GPU memory and layouts "
                           "(exit 1 when the config's layout does not fit)")  # fmt: skip
            from neva_tools.cli.plan import add_plan_options

            add_plan_options(a)
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
    if problems:
        print(f"FAILED: {len(problems)} problems")
        return 1
    status = _check_data(args, cfg)
    if args.plan:
        from neva_tools.cli.plan import print_plan

        status = max(status, print_plan(cfg, args))
    return status


def _check_data(args: argparse.Namespace, cfg: Any) -> int:
    """The data check of a valid config (``neva_tools.train.data_check``): its per-record report when it fails, or
    where the OK line points when it could not run."""
    import shlex

    from neva_tools.data.validate import format_report
    from neva_tools.train.data_check import blocking, config_data_check, trainable_note

    report, skipped = config_data_check(cfg, offline=args.offline)
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:
        config, overrides = None, [config, *overrides]
    command = shlex.join(["neva", "data", "validate", "--config", config or "conf/neva_config.yaml",
                          *(f"--set={o}" for o in overrides)])  # fmt: skip
    if report is None:
        later = f"; its data was not checked ({skipped}): run `{command}` before training" if skipped else ""
        print(f"OK: the config is valid{later}")
        return 0
    if blocking(report):
        print(format_report(report).rsplit("\n", 1)[0])  # the per-record problems and counts; the verdict below
        records = len({(p.file, p.location) for p in blocking(report)})
        print(f"FAILED: the config is valid but {records} record(s) of its data cannot be trained on; neva train "
              f"would stop on them before building the model (`{command}` lists them all)")  # fmt: skip
        return 1
    if not report.ok:
        print(f"note: {trainable_note(report, command)}")
    print(f"OK: the config is valid; its data's {report.records} records can be trained on (structure, <image> "
          f"counts, image files, token lengths within max_seq_length {cfg.model.data.max_seq_length})")  # fmt: skip
    return 0
