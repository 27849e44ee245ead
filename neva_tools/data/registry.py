"""The dataset registry (``conf/datasets.yaml``) and the ``"name%50,other"`` dataset lists of training configs.

A registry entry names an annotation file (LLaVA JSON/JSONL), the folder its relative media paths
resolve against (``data_path``; empty when paths are absolute) and optionally a conversation template.
``name%P`` uses P percent of a dataset: ``floor(n * P / 100)`` records drawn without replacement by a
generator seeded with the training seed and the dataset name (so each dataset's draw is reproducible
and independent of the others). P above 100 repeats the whole dataset ``floor(P / 100)`` times and
draws the remainder.
"""

from __future__ import annotations

import difflib
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from neva_tools.errors import NevaError

ENTRY_KEYS = {"annotation_path", "data_path", "template", "description"}
DEFAULT_REGISTRY = "conf/datasets.yaml"  # model.data.registry's default in conf/neva_config.yaml
# The registry shipped with the checkout (the package is installed editable, also in the containers: /opt/neva).
SHIPPED_REGISTRY = Path(__file__).resolve().parents[2] / DEFAULT_REGISTRY
_USE_RE = re.compile(r"^([A-Za-z0-9_.\-/]+?)(?:%(\d+(?:\.\d+)?))?$")


@dataclass(frozen=True)
class DatasetSpec:
    """One registered dataset."""

    name: str
    annotation_path: Path
    data_path: Path | None
    template: str | None = None


@dataclass(frozen=True)
class DatasetUse:
    """A dataset as a training config asks for it: which one and what percentage."""

    spec: DatasetSpec
    percent: float = 100.0


def _resolve(value: Any, base: Path) -> Path | None:
    if value in (None, ""):
        return None
    path = Path(os.path.expandvars(os.path.expanduser(str(value))))
    return path if path.is_absolute() else base / path


def find_registry(path: str | os.PathLike | None) -> Path:
    """The registry file ``model.data.registry`` names, as an absolute path (``~`` and ``$VARS`` expanded).

    A relative path resolves against the current directory; the default ``conf/datasets.yaml``, if not there,
    is the one shipped with the package (so ``neva train`` finds it from any directory)."""
    if path is None or str(path) == "":
        raise NevaError(f"model.data.registry is not set; give a registry YAML, e.g. {SHIPPED_REGISTRY}")
    given = Path(os.path.expandvars(os.path.expanduser(str(path))))
    looked = {Path(os.path.abspath(given)): "" if given.is_absolute() else " (relative to the current directory)"}
    if given == Path(DEFAULT_REGISTRY):
        looked.setdefault(SHIPPED_REGISTRY, " (the registry shipped with neva_tools)")
    for candidate in looked:
        if candidate.is_file():
            return candidate
    places = " and ".join(f"{place}{why}" for place, why in looked.items())
    raise NevaError(f"model.data.registry ({path}): no dataset registry file at {places}; give the registry YAML's "
                    "absolute path or one relative to the directory neva runs in")  # fmt: skip


def load_registry(path: str | os.PathLike | None) -> dict[str, DatasetSpec]:
    """Read a registry YAML (``name: {annotation_path, data_path, template}``) found by ``find_registry``;
    relative paths in its entries resolve against the registry file's folder (``~`` expanded, absolute paths
    kept). Unknown keys are an error listing the valid ones."""
    path = find_registry(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise NevaError(f"{path} is not valid YAML: {exc}") from None
    data = data.get("datasets", data) if isinstance(data, dict) else data
    if not isinstance(data, dict):
        raise NevaError(f"{path}: expected a mapping of dataset names to entries, found {type(data).__name__}")
    registry = {}
    for name, entry in data.items():
        if not isinstance(entry, dict) or "annotation_path" not in entry:
            raise NevaError(f"{path}: dataset {name!r} needs at least annotation_path, found {entry!r}")
        unknown = sorted(set(entry) - ENTRY_KEYS)
        if unknown:
            raise NevaError(f"{path}: dataset {name!r} has unknown keys {unknown}; valid keys: {sorted(ENTRY_KEYS)}")
        registry[str(name)] = DatasetSpec(
            name=str(name),
            annotation_path=_resolve(entry["annotation_path"], path.parent),  # type: ignore[arg-type]
            data_path=_resolve(entry.get("data_path"), path.parent),
            template=entry.get("template"),
        )
    return registry


def parse_dataset_list(text: str, registry: dict[str, DatasetSpec]) -> list[DatasetUse]:
    """``"cc3m%50,llava_instruct"`` → dataset uses; unknown names list the registered ones."""
    uses = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        m = _USE_RE.match(item)
        if m is None:
            raise NevaError(f"dataset {item!r} is not of the form name or name%PERCENT (e.g. cc3m%50)")
        name, percent = m.group(1), float(m.group(2) or 100)
        if name not in registry:
            close = difflib.get_close_matches(name, registry, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise NevaError(f"unknown dataset {name!r}{hint}; registered datasets: {', '.join(sorted(registry))}")
        if percent <= 0:
            raise NevaError(f"dataset {item!r}: the percentage must be positive")
        uses.append(DatasetUse(registry[name], percent))
    if not uses:
        raise NevaError(f"no datasets in {text!r}; give names from the registry, e.g. cc3m%50,llava_instruct")
    return uses


def sample_indices(n: int, percent: float, seed: int, name: str) -> list[int]:
    """Which of ``n`` records a ``name%percent`` use takes (see the module docstring); deterministic."""
    rng = random.Random(f"{seed}:{name}")
    whole, rest = divmod(percent, 100.0)
    indices = list(range(n)) * int(whole)
    indices += sorted(rng.sample(range(n), int(n * rest / 100)))
    return indices
