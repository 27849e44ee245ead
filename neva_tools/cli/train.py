"""``neva train``: run a NeVA pretraining or finetuning job from a config (under torchrun/srun or alone)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    """Add ``neva train``."""
    p = sub.add_parser(
        "train",
        parents=[parent],
        help="pretrain (stage 1) or finetune (stage 2) a NeVA model",
        description="Config precedence: conf/neva_config.yaml, then CONFIG (a recipe), then key=value overrides. "
        "Launch N processes with scripts/train.sh N CONFIG (torchrun) or under srun.",
    )
    p.add_argument("config", nargs="?", help="recipe YAML overriding conf/neva_config.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. trainer.max_steps=10")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``neva train``."""
    from neva_tools.train.supervision import die_with_launcher

    die_with_launcher()  # first: a rank whose launcher is killed must not train on unsupervised
    from neva_tools.config.load import load_config
    from neva_tools.train.run import train

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:  # only overrides were given
        config, overrides = None, [config, *overrides]
    cfg = load_config(config, overrides)
    if args.no_progress:
        cfg.trainer.enable_progress_bar = False
    nemo = train(cfg)  # on global rank 0: the run's .nemo (also when the run had already finished)
    if nemo is not None and args.quiet > args.verbose:
        print(nemo)  # -q: the result alone, on stdout (as `docker build -q`); else the end-of-run summary names it
    return 0
