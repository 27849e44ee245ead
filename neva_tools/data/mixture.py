"""``neva data mixture CONFIG.yaml``: a Megatron ``DATA_PATH`` blend and ``TRAIN_ITERS`` from token counts and ratios.

The config (YAML)::

    global_batch_size: 1024
    seq_length: 4096
    train_tokens: 300B          # or train_iters: 71526 (exactly one of the two)
    datasets:
      - prefix: /data/web_text_document       # written by preprocess_jsonl (.bin/.idx)
        ratio: 0.7
      - prefix: code/github_text_document     # relative: against this file's folder
        ratio: 0.3
        tokens: 52000000000                   # optional; counted from the .idx when absent

``ratio`` is the share of the training tokens drawn from a dataset; ratios are normalised to weights
(a warning is logged when they do not sum to 1). ``TRAIN_ITERS = ceil(train_tokens / (global_batch_size
* seq_length))``; the tokens trained on are ``TRAIN_ITERS * global_batch_size * seq_length``, and dataset
``i`` supplies ``weight_i`` of them: ``epochs_i = consumed_i / tokens_i`` (above 1, it is repeated).
Counts may be written as integers or with a K/M/B/T suffix (``300B``). Unknown keys are errors.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import asdict, dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from neva_tools.data.mmap import count_tokens, dataset_prefix
from neva_tools.errors import NevaError

log = logging.getLogger(__name__)

TOP_KEYS = {"global_batch_size", "seq_length", "train_tokens", "train_iters", "datasets"}
DATASET_KEYS = {"prefix", "ratio", "tokens"}
_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
_COUNT_RE = re.compile(r"^\s*(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)\s*([KMBGT]?)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class MixtureEntry:
    """One dataset of the blend."""

    prefix: str
    ratio: float
    weight: float
    tokens: int
    tokens_counted: bool
    consumed: int
    epochs: float


@dataclass(frozen=True)
class MixturePlan:
    """The blend string, the iteration count and what each dataset contributes."""

    global_batch_size: int
    seq_length: int
    train_iters: int
    train_tokens: int
    requested_train_tokens: int | None
    datasets: list[MixtureEntry]
    data_path: str

    @property
    def tokens_per_iter(self) -> int:
        """Tokens in one global batch."""
        return self.global_batch_size * self.seq_length


def _count(value: Any, where: str) -> int:
    """A positive count: an integer, an integral float, or a string such as ``300B``, ``2.5M`` or ``1e9``."""
    number: Decimal | None = None
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        number = Decimal(value)
    elif isinstance(value, str) and (m := _COUNT_RE.match(value)):
        number = Decimal(m.group(1)) * _SUFFIXES[m.group(2).upper()]
    if number is None or number <= 0 or number != number.to_integral_value():
        raise NevaError(f"{where} must be a positive whole number (e.g. 4096 or 300B), found {value!r}")
    return int(number)


def _ratio(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise NevaError(f"{where} must be a positive number, found {value!r}")
    return float(value)


def _resolve_prefix(value: Any, base: Path, where: str) -> str:
    if not isinstance(value, str | os.PathLike) or not str(value).strip():
        raise NevaError(f"{where} must be a dataset prefix path (e.g. data/web_text_document), found {value!r}")
    path = dataset_prefix(os.path.expandvars(os.path.expanduser(str(value))))
    if not path.is_absolute():
        path = Path(os.path.abspath(base / path))
    if re.search(r"\s", str(path)):
        raise NevaError(f"{where} {str(path)!r} contains whitespace, which Megatron's DATA_PATH cannot hold; rename it")
    return str(path)


def _unknown(keys: Any, valid: set[str], where: str) -> None:
    unknown = sorted(str(k) for k in set(keys) - valid)
    if unknown:
        raise NevaError(f"{where}: unknown keys {unknown}; valid keys: {sorted(valid)}")


def plan_mixture(config: str | os.PathLike, *, check_prefixes: bool = True) -> MixturePlan:
    """Read a mixture YAML and plan it; relative prefixes resolve against the file's folder."""
    path = Path(config)
    if not path.is_file():
        raise NevaError(f"mixture config {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise NevaError(f"{path} is not valid YAML: {exc}") from None
    return plan_from_dict(data, source=str(path), base_dir=path.parent, check_prefixes=check_prefixes)


def plan_from_dict(
    data: Any, *, source: str = "mixture config", base_dir: Path | None = None, check_prefixes: bool = True
) -> MixturePlan:
    """Validate a parsed mixture config and compute the plan (see the module docstring)."""
    base = Path.cwd() if base_dir is None else base_dir
    if not isinstance(data, dict):
        raise NevaError(f"{source}: expected a mapping with keys {sorted(TOP_KEYS)}, found {type(data).__name__}")
    _unknown(data, TOP_KEYS, source)
    for key in ("global_batch_size", "seq_length", "datasets"):
        if key not in data:
            raise NevaError(f"{source}: missing required key {key!r}")
    gbs = _count(data["global_batch_size"], f"{source}: global_batch_size")
    seq = _count(data["seq_length"], f"{source}: seq_length")
    if ("train_tokens" in data) == ("train_iters" in data):
        found = "both" if "train_tokens" in data else "neither"
        raise NevaError(f"{source}: give exactly one of train_tokens and train_iters, found {found}")
    requested = _count(data["train_tokens"], f"{source}: train_tokens") if "train_tokens" in data else None
    if requested is not None:
        iters = -(-requested // (gbs * seq))  # ceil, in integers
    else:
        iters = _count(data["train_iters"], f"{source}: train_iters")
    train_tokens = iters * gbs * seq

    items = data["datasets"]
    if not isinstance(items, list) or not items:
        raise NevaError(f"{source}: datasets must be a non-empty list of {{prefix, ratio, tokens}}, found {items!r}")
    parsed: list[tuple[str, float, int, bool]] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        where = f"{source}: datasets[{i}]"
        if not isinstance(item, dict):
            raise NevaError(f"{where} must be a mapping with prefix and ratio, found {item!r}")
        _unknown(item, DATASET_KEYS, where)
        for key in ("prefix", "ratio"):
            if key not in item:
                raise NevaError(f"{where}: missing required key {key!r}")
        prefix = _resolve_prefix(item["prefix"], base, f"{where}.prefix")
        if prefix in seen:
            raise NevaError(
                f"{where}.prefix {prefix} is also datasets[{seen[prefix]}]; list it once with the sum of ratios"
            )
        seen[prefix] = i
        ratio = _ratio(item["ratio"], f"{where}.ratio")
        if check_prefixes:
            missing = [p for p in (f"{prefix}.bin", f"{prefix}.idx") if not Path(p).is_file()]
            if missing:
                raise NevaError(
                    f"{where}.prefix {item['prefix']!r}: {' and '.join(missing)} not found; "
                    "check the path (relative paths are read from the config's folder) or run neva data preprocess"
                )
        if "tokens" in item:
            tokens, counted = _count(item["tokens"], f"{where}.tokens"), False
        else:
            tokens, counted = count_tokens(prefix).tokens, True
            if tokens == 0:
                raise NevaError(f"{where}.prefix {prefix} holds no tokens; remove it from the mixture")
        parsed.append((prefix, ratio, tokens, counted))

    total_ratio = sum(ratio for _, ratio, _, _ in parsed)
    if not math.isclose(total_ratio, 1.0, rel_tol=1e-6):
        log.warning("%s: ratios sum to %g, not 1; normalising them to weights", source, total_ratio)
    entries = []
    for prefix, ratio, tokens, counted in parsed:
        weight = ratio / total_ratio
        consumed = round(weight * train_tokens)
        entries.append(MixtureEntry(prefix, ratio, weight, tokens, counted, consumed, consumed / tokens))
    data_path = " ".join(f"{e.weight:.8g} {e.prefix}" for e in entries)
    return MixturePlan(gbs, seq, iters, train_tokens, requested, entries, data_path)


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _shell_quote(text: str) -> str:
    """``text`` inside double quotes, with the characters the shell expands there escaped."""
    return '"' + re.sub(r'(["$`\\])', r"\\\1", text) + '"'


def format_plan(plan: MixturePlan) -> str:
    """The table (as ``#`` comments) and the ``DATA_PATH="..."``/``TRAIN_ITERS=N`` lines: a valid shell snippet."""
    header = ("dataset", "weight", "tokens", "consumed", "epochs")
    rows = [
        (
            e.prefix,
            f"{e.weight:.4f}",
            _human(e.tokens) + ("" if e.tokens_counted else "*"),
            _human(e.consumed),
            f"{e.epochs:.3f}",
        )
        for e in plan.datasets
    ]
    total_tokens = sum(e.tokens for e in plan.datasets)
    rows.append(
        ("total", "1.0000", _human(total_tokens), _human(plan.train_tokens), f"{plan.train_tokens / total_tokens:.3f}")
    )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))

    out = [
        line(header),
        "  ".join("-" * w for w in widths),
        *map(line, rows[:-1]),
        "  ".join("-" * w for w in widths),
        line(rows[-1]),
    ]
    if not all(e.tokens_counted for e in plan.datasets):
        out.append("* token count taken from the config, not counted")
    requested = f" (asked for {plan.requested_train_tokens:,})" if plan.requested_train_tokens is not None else ""
    out += [
        "",
        f"global_batch_size={plan.global_batch_size} seq_length={plan.seq_length} "
        f"tokens/iteration={plan.tokens_per_iter:,} train tokens={plan.train_tokens:,}{requested}",
    ]
    comments = [f"# {text}".rstrip() for text in out]  # the whole output can be sourced by a shell
    return "\n".join([*comments, f"DATA_PATH={_shell_quote(plan.data_path)}", f"TRAIN_ITERS={plan.train_iters}"])


def plan_to_dict(plan: MixturePlan) -> dict[str, Any]:
    """The plan as JSON-ready data (``DATA_PATH`` and ``TRAIN_ITERS`` under their shell names too)."""
    out = asdict(plan)
    out["tokens_per_iter"] = plan.tokens_per_iter
    out["DATA_PATH"] = plan.data_path
    out["TRAIN_ITERS"] = plan.train_iters
    return out
