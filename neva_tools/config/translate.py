"""Applying the NeMo key table (``neva_tools.config.nemo_keys``) to one config source: a recipe or NeMo file, or the
command line, turned into our layout (:func:`translate`); keys that are neither ours nor in the table are unknown,
and every unknown key of a source is reported at once with suggestions."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from neva_tools.config.nemo_keys import NEMO_KEYS, Derived, Mapped, Ours, Refused, Same


@dataclass
class Translated:
    """One config source in our layout, and what the table did to it."""

    config: DictConfig
    inert: list[str] = field(default_factory=list)  # keys accepted with no effect
    mapped: list[str] = field(default_factory=list)  # "nemo.key → our.key"
    same: dict[str, str] = field(default_factory=dict)  # key → the key it must equal
    same_values: dict[str, Any] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # refused values, conflicting mapped values


def flat_items(cfg: DictConfig | Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, raw value) of every leaf; interpolations stay strings; an empty mapping is a leaf."""
    items: list[tuple[str, Any]] = []
    container = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else cfg
    for key, value in container.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            items.extend(flat_items(value, full + "."))
        else:
            items.append((full, value))
    return items


def _resolved(raw: DictConfig) -> dict[str, Any]:
    """Values of ``raw`` with the interpolations that resolve inside it resolved (others keep their raw text)."""
    out = {}
    for key, value in flat_items(raw):
        if isinstance(value, str) and "${" in value:
            with contextlib.suppress(Exception):  # a reference outside this source stays (resolved after the merge)
                value = OmegaConf.select(raw, key, throw_on_missing=False)
        out[key] = value
    return out


_REFERENCE = re.compile(r"\$\{([^}:]+)\}")


def _absolute(key: str, ref: str) -> str:
    """The absolute key of interpolation reference ``ref`` written at ``key`` (OmegaConf's relative ``.``/``..``)."""
    if not ref.startswith("."):
        return ref
    parent = key.split(".")[:-1]
    dots = len(ref) - len(ref.lstrip("."))
    base = parent[: len(parent) - (dots - 1)] if dots > 1 else parent
    return ".".join([*base, ref.lstrip(".")])


def _retarget(key: str, value: Any, is_ours: Callable[[str], bool]) -> Any | None:
    """``value`` kept as an interpolation that follows later overrides: references to our keys stay, references to
    mapped NeMo keys point at their targets (``${.encoder_seq_length}`` → ``${model.data.max_seq_length}``). None when
    a reference is neither (then the value resolved inside its source is used)."""
    if not isinstance(value, str) or "${" not in value:
        return value

    def swap(match: re.Match[str]) -> str:
        ref = _absolute(key, match.group(1))
        fate = NEMO_KEYS.get(ref)
        if isinstance(fate, Mapped) and fate.convert is None:
            ref = fate.target
        if ref == key or not is_ours(ref):  # a mapped key that lands here, or not ours
            raise KeyError(ref)
        return "${" + ref + "}"

    try:
        return _REFERENCE.sub(swap, value)
    except KeyError:
        return None


def same_value(a: Any, b: Any) -> bool:
    if isinstance(a, (ListConfig, DictConfig)):
        a = OmegaConf.to_container(a)
    if isinstance(b, (ListConfig, DictConfig)):
        b = OmegaConf.to_container(b)
    if isinstance(a, str) and isinstance(b, str):
        return a.lower() == b.lower()
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or str(a).lower() == str(b).lower()
    return a == b


def _allowed(value: Any, allowed: Iterable[Any]) -> bool:
    if value in ("", [], {}) and None in allowed:
        return True
    return any(same_value(value, a) for a in allowed)


def translate(raw: DictConfig, source: str, is_ours: Callable[[str], bool]) -> Translated:
    """``raw`` (one config source) in our layout: table keys mapped, inert or refused keys removed, ours kept.

    ``is_ours(key)`` says whether a dotted key exists in our base config. Nothing is raised: unknown keys and problems
    are returned so that the caller reports all of them at once.
    """
    values = _resolved(raw)
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    result = Translated(OmegaConf.create())
    for key, value in flat_items(raw):
        fate = NEMO_KEYS.get(key)
        if fate is None or isinstance(fate, (Ours, Derived)):
            if fate is None and not is_ours(key):
                result.unknown.append(key)
                continue
            target, new = key, _retarget(key, value, is_ours)
            if new is None:
                new = values[key]
        elif isinstance(fate, Mapped):
            resolved = values[key]
            new = fate.convert(resolved) if fate.convert else resolved
            if new is None or new == "":
                if fate.convert:
                    result.inert.append(key)
                continue  # NeMo's null: the default here
            target = fate.target
            result.mapped.append(f"{key} → {target}")
        elif isinstance(fate, Same):
            result.same[key] = fate.other
            result.same_values[key] = values[key]
            continue
        elif isinstance(fate, Refused):
            if _allowed(values[key], fate.allowed):
                result.inert.append(key)
            else:
                allowed = ", ".join("null" if a is None else str(a) for a in fate.allowed)
                result.problems.append(f"{source}: {key} is {values[key]!r}, which is not supported here: "
                                       f"{fate.reason} (accepted: {allowed}; or delete the key)")  # fmt: skip
            continue
        else:
            result.inert.append(key)
            continue
        if target in out and new is None:
            continue  # a null never overrides a value set by another key of the same source
        if target in out and out[target] is not None and not same_value(out[target], new):
            result.problems.append(f"{source}: {origin[target]} ({out[target]!r}) and {key} ({new!r}) both set "
                                   f"{target}; keep one")  # fmt: skip
            continue
        out[target], origin[target] = new, key
    result.config = OmegaConf.from_dotlist([]) if not out else _nested(out)
    return result


def _nested(flat: Mapping[str, Any]) -> DictConfig:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return OmegaConf.create(tree)
