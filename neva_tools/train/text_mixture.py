"""A mixture YAML given as ``model.text_pretrain.data_path`` also sets the run's length, batch and sequence length.

The YAML of ``neva data mixture`` holds ``GLOBAL_BATCH_SIZE``, ``SEQ_LEN`` and (given, or derived from token counts)
``TRAIN_ITERS``: NEO's workflow copies them into the training script. Here they become ``model.global_batch_size``,
``model.text_pretrain.seq_length`` and ``trainer.max_steps``. A key still at its default of
``conf/neva_config.yaml`` takes the YAML's value; a key the recipe or the command line sets to the YAML's value is
fine; a different value is an error naming both (a value equal to the default counts as not set).
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from neva_tools.errors import NevaError

logger = logging.getLogger(__name__)

#: config key → the mixture YAML's key (NEO's spelling) that sets it.
MIXTURE_KEYS = {
    "trainer.max_steps": "TRAIN_ITERS",
    "model.global_batch_size": "GLOBAL_BATCH_SIZE",
    "model.text_pretrain.seq_length": "SEQ_LEN",
}


def mixture_file(data_path: Any) -> Path | None:
    """The mixture YAML that ``model.text_pretrain.data_path`` names (as ``parse_blend`` reads it), else None."""
    if isinstance(data_path, str | os.PathLike):
        tokens = str(data_path).split()
    elif isinstance(data_path, Sequence):
        tokens = [str(item) for item in data_path]
    else:
        return None
    return Path(tokens[0]) if len(tokens) == 1 and tokens[0].endswith((".yaml", ".yml")) else None


def mixture_values(cfg: DictConfig) -> tuple[Path, dict[str, int]] | None:
    """(the YAML, {config key: its value}) when ``model.text_pretrain.data_path`` is a mixture YAML, else None."""
    path = mixture_file(OmegaConf.select(cfg, "model.text_pretrain.data_path"))
    if path is None:
        return None
    from neva_tools.data.mixture import plan_mixture

    plan = plan_mixture(path)
    values = (plan.train_iters, plan.global_batch_size, plan.seq_length)
    return path, dict(zip(MIXTURE_KEYS, values, strict=True))


def _defaults() -> Mapping[str, Any]:
    """The base config's values of ``MIXTURE_KEYS``."""
    from neva_tools.config.load import BASE_CONFIG

    base = OmegaConf.load(BASE_CONFIG)
    return {key: OmegaConf.select(base, key) for key in MIXTURE_KEYS}


def apply_mixture(cfg: DictConfig, defaults: Mapping[str, Any] | None = None) -> DictConfig:
    """``cfg`` (a copy) with the mixture YAML's values applied, or ``cfg`` itself when data_path is not a YAML.

    ``defaults`` (config key → default value) is read from ``conf/neva_config.yaml`` when not given.
    """
    found = mixture_values(cfg)
    if found is None:
        return cfg
    path, values = found
    defaults = _defaults() if defaults is None else defaults
    conflicts, applied = [], []
    for key, value in values.items():
        current = OmegaConf.select(cfg, key)
        if current == value:
            continue
        if current != defaults.get(key):
            conflicts.append(f"{key} is {current} (recipe or command line) but {path} gives {MIXTURE_KEYS[key]} "
                             f"{value}")  # fmt: skip
        else:
            applied.append(key)
    if conflicts:
        raise NevaError("the mixture YAML and the config disagree: " + "; ".join(conflicts) + ". Remove the key "
                        "from the recipe/command line (the YAML's value then applies) or make them equal")  # fmt: skip
    out = copy.deepcopy(cfg)
    for key in applied:
        OmegaConf.update(out, key, values[key], merge=False)
        logger.info("%s = %s from %s (%s)", key, values[key], path, MIXTURE_KEYS[key])
    return out
