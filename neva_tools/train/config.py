"""Training configuration: ``conf/neva_config.yaml`` → recipe YAML → ``key=value`` overrides, in struct mode.

A key that does not exist in the base config is an error naming the closest valid key.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from neva_tools.errors import NevaError

BASE_CONFIG = Path(__file__).resolve().parents[2] / "conf" / "neva_config.yaml"


def _all_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key in cfg:
        full = f"{prefix}{key}"
        keys.append(full)
        value = cfg._get_node(key)
        if isinstance(value, DictConfig):
            keys.extend(_all_keys(value, full + "."))
    return keys


def _unknown_key_error(base: DictConfig, key: str, source: str) -> NevaError:
    close = difflib.get_close_matches(key, _all_keys(base), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return NevaError(f"{source}: unknown config key {key!r}{hint}")


def _merge_checked(base: DictConfig, other: DictConfig, source: str) -> DictConfig:
    for key in _flat_keys(other):
        if OmegaConf.select(base, key, default="__missing__") == "__missing__" and not _is_dict_key(base, key):
            raise _unknown_key_error(base, key, source)
    return OmegaConf.merge(base, other)


def _flat_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    out = []
    for key in cfg:
        node = cfg._get_node(key)
        full = f"{prefix}{key}"
        if isinstance(node, DictConfig) and len(node):
            out.extend(_flat_keys(node, full + "."))
        else:
            out.append(full)
    return out


def _is_dict_key(base: DictConfig, key: str) -> bool:
    try:
        return isinstance(OmegaConf.select(base, key, throw_on_missing=False), DictConfig)
    except OmegaConfBaseException:
        return False


def load_config(
    recipe: str | Path | None = None, overrides: Sequence[str] = (), base: Path = BASE_CONFIG
) -> DictConfig:
    """The merged configuration (base → recipe → overrides), resolved and in struct mode."""
    cfg = OmegaConf.load(base)
    if recipe is not None:
        if not Path(recipe).is_file():
            raise NevaError(f"config {recipe} does not exist")
        cfg = _merge_checked(cfg, OmegaConf.load(recipe), str(recipe))
    for item in overrides:
        if "=" not in item:
            raise NevaError(f"override {item!r} is not of the form key=value")
        cfg = _merge_checked(cfg, OmegaConf.from_dotlist([item]), "command line")
    OmegaConf.set_struct(cfg, True)
    try:
        OmegaConf.resolve(cfg)
    except (ConfigAttributeError, ConfigKeyError) as exc:
        raise NevaError(f"config interpolation failed: {exc}") from None
    return cfg
