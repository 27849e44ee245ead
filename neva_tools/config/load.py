"""Training configuration: ``conf/neva_config.yaml`` → recipe YAML → ``key=value`` overrides, in struct mode.

A recipe may be one of ours or a NeMo NeVA config as NeMo publishes it: every source first goes through NeMo's key
table (``neva_tools.config.nemo_keys``). Keys that are neither ours nor NeMo's are reported all at once, each with
the closest keys by name and by meaning (``neva_tools.config.suggest``). A recipe path is looked up in the current
directory, then among the shipped recipes; an input path in a recipe that exists only next to the recipe resolves
against the recipe's directory.
"""

from __future__ import annotations

import functools
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    InterpolationResolutionError,
    OmegaConfBaseException,
)

from neva_tools.config import translate as nemo_translate
from neva_tools.config.suggest import suggestions
from neva_tools.config.values import show, value_problems
from neva_tools.errors import NevaError

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
BASE_CONFIG = ROOT / "conf" / "neva_config.yaml"
RECIPES = ROOT / "recipes"

#: Keys naming input files or directories: a relative value in a recipe that exists only next to the recipe resolves
#: against the recipe's directory (a value that exists from the current directory keeps today's meaning).
INPUT_PATH_KEYS = (
    "model.mm_cfg.llm.from_pretrained",
    "model.mm_cfg.vision_encoder.from_pretrained",
    "model.mm_cfg.pretrain_mm_mlp_adapter",
    "model.tokenizer.model",
    "model.data.data_path",
    "model.data.image_folder",
    "model.data.registry",
    "model.text_pretrain.data_path",
    "exp_manager.resume_from_checkpoint",
)
#: Defaults for NeMo's ``null`` where null has a meaning in NeMo that we spell out.
NULL_DEFAULTS = {"exp_manager.exp_dir": "runs"}


def _register_resolvers() -> None:
    """NeMo's OmegaConf resolvers that its configs use (``${multiply:a,b}``)."""
    if not OmegaConf.has_resolver("multiply"):
        register = getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver
        register("multiply", lambda a, b: a * b)


@dataclass
class LoadReport:
    """What loading did besides merging: NeMo keys that were moved, or accepted with no effect."""

    mapped: list[str] = field(default_factory=list)
    inert: list[str] = field(default_factory=list)
    recipe: Path | None = None


def _all_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key in cfg:
        full = f"{prefix}{key}"
        keys.append(full)
        value = cfg._get_node(key)
        if isinstance(value, DictConfig):
            keys.extend(_all_keys(value, full + "."))
    return keys


def _is_ours(base: DictConfig, key: str) -> bool:
    try:
        node = OmegaConf.select(base, key, default="__missing__", throw_on_resolution_failure=False)
    except OmegaConfBaseException:
        return True  # present, but an interpolation that needs later keys
    return not (isinstance(node, str) and node == "__missing__")


def find_recipe(recipe: str | Path) -> Path:
    """``recipe`` from the current directory, else among the shipped recipes (``recipes/…``, with or without it)."""
    path = Path(recipe).expanduser()
    if path.is_file():
        return path
    tried = [path.resolve()]
    if not path.is_absolute():
        for candidate in (ROOT / path, RECIPES / path):
            if candidate.is_file():
                return candidate
            tried.append(candidate)
    places = " or ".join(str(p) for p in dict.fromkeys(tried))
    raise NevaError(f"config {recipe} does not exist (looked at {places}); give a recipe YAML's path, e.g. "
                    "recipes/tiny_cpu/stage1_pretrain.yaml")  # fmt: skip


def read_recipe(path: Path) -> DictConfig:
    """The mapping of keys a recipe YAML holds; a file that is not one (not UTF-8, not YAML, nested too deep, a list
    or a single value, unreadable) is a ``NevaError`` naming it."""
    what = f"config {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise NevaError(f"{what} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} on line {line}); save it as "
                        "UTF-8") from None  # fmt: skip
    except OSError as exc:
        raise NevaError(f"cannot read {what}: {exc.strerror or exc}") from None
    try:
        top = yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        if top is not None and not isinstance(top, yaml.MappingNode):
            kind = "a list" if isinstance(top, yaml.SequenceNode) else f"the single value {show(top.value)}"
            raise NevaError(f"{what} must be a YAML mapping of keys (like conf/neva_config.yaml: trainer:, model:, "
                            f"...), but it holds {kind}")  # fmt: skip
        raw = OmegaConf.load(io.StringIO(text))
    except yaml.YAMLError as exc:
        raise NevaError(f"{what} is not valid YAML: {yaml_problem(exc)}") from None
    except RecursionError:
        raise NevaError(f"{what} cannot be read: nesting too deep in an input file") from None
    except (OmegaConfBaseException, ValueError, TypeError, OSError) as exc:  # keys OmegaConf refuses, alias bombs
        raise NevaError(f"{what} cannot be read as a config: {str(exc).splitlines()[0]}") from None
    assert isinstance(raw, DictConfig)
    return raw


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error on one line: what is wrong and where (``line 3, column 5: mapping values are not allowed``)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else str(problem)


def _merge(cfg: DictConfig, source: str, new: DictConfig, problems: list[str]) -> DictConfig:
    """``new`` merged over ``cfg``; a value that cannot replace the one there (a mapping over a list) is a problem and
    is left out."""
    try:
        return OmegaConf.merge(cfg, new)
    except (OmegaConfBaseException, TypeError, ValueError):
        pass
    for key, value in nemo_translate.flat_items(new):
        one: dict[str, Any] = {}
        node = one
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
        try:
            cfg = OmegaConf.merge(cfg, one)
        except (OmegaConfBaseException, TypeError, ValueError):
            there = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
            kind = "a list" if isinstance(there, ListConfig) else "a mapping" if isinstance(there, DictConfig) else \
                "a single value"  # fmt: skip
            problems.append(f"{source}: {key} ({show(value)}) must be {kind}, as in conf/neva_config.yaml")
    return cfg


def _structure_problems(base: DictConfig, cfg: DictConfig, prefix: str = "") -> list[str]:
    """Mappings of the base config that a source replaced by a single value or a list (``model.optim: 5``)."""
    problems = []
    for key in base:
        node = base._get_node(key)
        if not isinstance(node, DictConfig) or not len(node):
            continue
        full = f"{prefix}{key}"
        there = cfg._get_node(key) if key in cfg else None
        if not isinstance(there, DictConfig) or there._is_none():
            value = None if there is None else there._value() if not isinstance(there, ListConfig) else there
            keys = ", ".join(f"{full}.{k}" for k in list(node)[:3])
            problems.append(f"{full} ({show(value)}) must be a mapping of keys ({keys}, ...), as in "
                            "conf/neva_config.yaml")  # fmt: skip
        else:
            problems += _structure_problems(node, there, full + ".")
    return problems


def _recipe_relative(cfg: DictConfig, recipe: Path) -> None:
    """Input paths of ``cfg`` (a translated recipe) that exist only next to the recipe point there."""
    here = recipe.resolve().parent
    for key in INPUT_PATH_KEYS:
        value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        if not isinstance(value, str) or not value or "${" in value or Path(value).expanduser().is_absolute():
            continue
        candidate = here / value
        if not Path(value).exists() and candidate.exists():
            OmegaConf.update(cfg, key, str(candidate), merge=False)


def load_config_report(
    recipe: str | Path | None = None, overrides: Sequence[str] = (), base: Path = BASE_CONFIG
) -> tuple[DictConfig, LoadReport]:
    """The merged configuration (base → recipe → overrides), resolved and in struct mode, and what loading did.

    Raises one ``NevaError`` listing every unknown key (with suggestions) and every refused value of all sources.
    """
    _register_resolvers()
    cfg = defaults = OmegaConf.load(base)
    report = LoadReport()
    sources: list[tuple[str, DictConfig]] = []
    if recipe is not None:
        report.recipe = find_recipe(recipe)
        sources.append((str(recipe), read_recipe(report.recipe)))
    for item in overrides:
        if "=" not in item:
            raise NevaError(f"override {item!r} is not of the form key=value")
        try:
            sources.append(("command line", OmegaConf.from_dotlist([item])))
        except yaml.YAMLError as exc:
            raise NevaError(f"override {item!r} cannot be parsed: {yaml_problem(exc)}") from None
        except RecursionError:
            raise NevaError(f"override {item!r} cannot be parsed: nesting too deep") from None
        except (OmegaConfBaseException, ValueError) as exc:
            raise NevaError(f"override {item!r} cannot be parsed: {exc}") from None
    unknown: list[tuple[str, str]] = []
    problems: list[str] = []
    same: dict[str, tuple[str, Any]] = {}
    for source, raw in sources:
        done = nemo_translate.translate(raw, source, functools.partial(_is_ours, cfg))
        unknown += [(source, key) for key in done.unknown]
        problems += done.problems
        report.mapped += [m for m in done.mapped if m not in report.mapped]
        report.inert += [k for k in done.inert if k not in report.inert]
        same.update({k: (other, done.same_values[k]) for k, other in done.same.items()})
        if source != "command line" and report.recipe is not None:
            _recipe_relative(done.config, report.recipe)
        cfg = _merge(cfg, source, done.config, problems)
    if unknown:
        ours = _all_keys(cfg)
        lines = [f"{source}: {key}{suggestions(key, ours)}" for source, key in unknown]
        problems = [f"{len(unknown)} unknown config key(s) (docs/nemo_config_keys.md lists NeMo's keys and "
                    "conf/neva_config.yaml ours):", *lines, *problems]  # fmt: skip
    shape = _structure_problems(defaults, cfg)
    if not shape:  # the keys are where the table looks for them
        for key, default in NULL_DEFAULTS.items():
            if OmegaConf.select(cfg, key) is None:
                OmegaConf.update(cfg, key, default, merge=False)
        problems += value_problems(cfg)  # types and ranges (neva_tools.config.values)
    if problems or shape:
        raise NevaError("\n  ".join([*problems, *shape]))
    OmegaConf.set_struct(cfg, True)
    try:
        OmegaConf.resolve(cfg)
    except (ConfigAttributeError, ConfigKeyError, InterpolationResolutionError) as exc:
        raise NevaError(f"config interpolation failed: {exc}") from None
    for key, (other, value) in same.items():
        if (not isinstance(value, str) or "${" not in value) and not nemo_translate.same_value(
            value, OmegaConf.select(cfg, other)
        ):
            raise NevaError(f"{key} is {value!r} but {other} is {OmegaConf.select(cfg, other)!r}; they must "
                            f"agree (set {other} only)")  # fmt: skip
    return cfg, report


def load_config(
    recipe: str | Path | None = None, overrides: Sequence[str] = (), base: Path = BASE_CONFIG
) -> DictConfig:
    """The merged configuration (base → recipe → overrides), resolved and in struct mode.

    NeMo keys that were moved or have no effect here are logged once (INFO).
    """
    cfg, report = load_config_report(recipe, overrides, base)
    if report.mapped:
        logger.info("NeMo keys read as ours: %s", ", ".join(report.mapped))
    if report.inert:
        logger.info("NeMo keys accepted with no effect here (docs/nemo_config_keys.md says why): %s",
                    ", ".join(report.inert))  # fmt: skip
    return cfg
