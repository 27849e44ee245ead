"""``neva data mixture CONFIG.yaml``: a Megatron ``DATA_PATH`` blend and ``TRAIN_ITERS`` from token counts and ratios.

The YAML forms are in ``FORMAT_HELP`` (also ``neva data mixture --help`` and the README). Dataset ``i`` gets the
share ``ratio_i`` (``datasets``), ``w_i`` (``DATA_PATH``; its size when the weight is left out) or ``tokens_i * N``
(NEO's ``N_ROUND``) of the training tokens; shares are normalised to weights (for ``datasets`` a warning is logged
when they do not sum to 1). ``TRAIN_ITERS = ceil(train_tokens / (global_batch_size * seq_length))``, where
``train_tokens`` is given, or with ``N_ROUND`` and no length the sum of ``tokens_i * N`` (NEO's
``parse_mixture.py``: every dataset repeated its N times). The tokens trained on are ``TRAIN_ITERS *
global_batch_size * seq_length``, and dataset ``i`` supplies ``weight_i`` of them: ``epochs_i = consumed_i /
tokens_i`` (above 1, it is repeated). Token counts are read from the ``.idx`` files unless given.
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

FORMAT_HELP = """\
Plan a Megatron text-pretraining blend: prints DATA_PATH="w1 prefix1 w2 prefix2 ..." and TRAIN_ITERS=N
(the whole output can be sourced by a shell) with what each dataset contributes.

The mixture YAML, in our spelling:
  global_batch_size: 1024              # samples per optimizer step (NEO: GLOBAL_BATCH_SIZE)
  seq_length: 4096                     # tokens per sample (NEO: SEQ_LEN)
  train_tokens: 300B                   # or train_iters: 71526 (NEO: TRAIN_TOKENS / TRAIN_ITERS)
  datasets:                            # share of the training tokens; tokens: optional, else read from the .idx
    - {prefix: web_text_document, ratio: 0.7}
    - {prefix: code_text_document.bin, ratio: 0.3, tokens: 52B}
or NEO's neo/scripts/mixture_cfg.yml: each dataset of N_ROUND is trained on N times; TRAIN_ITERS follows
  GLOBAL_BATCH_SIZE: 1024
  SEQ_LEN: 8192
  1_ROUND: [/data/web_text_document.bin]
  0.5_ROUND: [/data/code_text_document.bin, /data/math_text_document.bin]
or a ready blend with its length:
  GLOBAL_BATCH_SIZE: 1024
  SEQ_LEN: 8192
  TRAIN_ITERS: 71526
  DATA_PATH: "0.7 /data/web_text_document 0.3 /data/code_text_document"

Relative paths are read from the YAML's folder; counts take K/M/B/T suffixes (300B); unknown keys are errors.
Given as model.text_pretrain.data_path, the YAML also sets trainer.max_steps (TRAIN_ITERS), model.global_batch_size
and model.text_pretrain.seq_length; a different value in the recipe or on the command line is an error.
"""

TOP_KEYS = {"global_batch_size", "seq_length", "train_tokens", "train_iters", "datasets", "data_path"}
#: NEO's spelling (neo/scripts/mixture_cfg.yml, pretrain_*.sh) → ours.
ALIASES = {"GLOBAL_BATCH_SIZE": "global_batch_size", "SEQ_LEN": "seq_length", "TRAIN_TOKENS": "train_tokens",
           "TRAIN_ITERS": "train_iters", "DATA_PATH": "data_path"}  # fmt: skip
_SPELLING = {ours: neo for neo, ours in ALIASES.items()}
IGNORED_KEYS = {"TOKEN_COUNT_LOG_DIR"}  # NEO's parse_mixture.py reads token counts from logs; we read the .idx
_ROUND_RE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)_ROUND$")
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


def _unknown(keys: Any, valid: set[str], where: str, also: str = "") -> None:
    unknown = sorted(str(k) for k in set(keys) - valid)
    if unknown:
        raise NevaError(f"{where}: unknown keys {unknown}; valid keys: {sorted(valid)}{also}")


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


def _canonical(data: dict, source: str) -> tuple[dict[str, Any], list[tuple[str, float, Any]]]:
    """(the keys under our names, NEO's ``N_ROUND`` lists as (key, N, value)); both spellings must agree."""
    out: dict[str, Any] = {}
    rounds: list[tuple[str, float, Any]] = []
    for key, value in data.items():
        name = str(key)
        if name in IGNORED_KEYS:
            log.info("%s: %s is not needed (token counts are read from the .idx files); ignored", source, name)
        elif m := _ROUND_RE.match(name):
            repeat = float(m.group(1))
            if not math.isfinite(repeat) or repeat <= 0:
                raise NevaError(f"{source}: {name} repeats its datasets {m.group(1)} times; it must be positive")
            rounds.append((name, repeat, value))
        elif name.endswith("_ROUND"):
            raise NevaError(f"{source}: {name} is not N_ROUND with N a number of repeats (e.g. 1_ROUND, 0.5_ROUND)")
        elif name in ALIASES:
            ours = ALIASES[name]
            if ours in data and data[ours] != value:
                raise NevaError(f"{source}: {name} ({value!r}) and {ours} ({data[ours]!r}) differ; give one of them")
            out[ours] = value
        else:
            out[name] = value
    return out, rounds


def _blend_items(value: Any, source: str) -> list[tuple[Any, float | None, str]]:
    """(prefix, weight or None, where) of a ``DATA_PATH`` value: ``"w1 p1 w2 p2 ..."`` or prefixes alone."""
    tokens = value.split() if isinstance(value, str) else [str(v) for v in value] if isinstance(value, list) else []
    if not tokens:
        raise NevaError(f'{source}: DATA_PATH must be "w1 prefix1 w2 prefix2 ..." or prefixes, found {value!r}')

    def number(token: str) -> float | None:
        try:
            return float(token)
        except ValueError:
            return None

    if len(tokens) % 2 == 0 and all(number(t) is not None for t in tokens[0::2]):
        return [(p, _ratio(number(w), f"{source}: DATA_PATH weight {w}"), f"{source}: DATA_PATH[{i}]")
                for i, (w, p) in enumerate(zip(tokens[0::2], tokens[1::2], strict=True))]  # fmt: skip
    if any(number(t) is not None for t in tokens):
        raise NevaError(f"{source}: DATA_PATH {' '.join(tokens)!r} mixes numbers and prefixes; write \"w1 prefix1 "
                        "w2 prefix2 ...\" (a weight before each prefix) or prefixes only")  # fmt: skip
    return [(p, None, f"{source}: DATA_PATH[{i}]") for i, p in enumerate(tokens)]


def _items(data: dict, rounds: list[tuple[str, float, Any]], source: str) -> tuple[list[tuple], str]:
    """The datasets as (prefix, ratio or None, tokens or None, repeat or None, where), and the form they came in."""
    forms = [f for f, present in (("datasets", "datasets" in data), ("DATA_PATH", "data_path" in data),
                                  ("N_ROUND", bool(rounds))) if present]  # fmt: skip
    if len(forms) != 1:
        found = f"found {' and '.join(forms)}" if forms else "found none"
        raise NevaError(f"{source}: list the datasets in exactly one way: datasets, DATA_PATH or NEO's N_ROUND keys "
                        f"({found})")  # fmt: skip
    if forms[0] == "DATA_PATH":
        return [(p, w, None, None, where) for p, w, where in _blend_items(data["data_path"], source)], "DATA_PATH"
    if forms[0] == "N_ROUND":
        items = []
        for key, repeat, value in rounds:
            paths = [value] if isinstance(value, str) else value
            if not isinstance(paths, list) or not paths:
                raise NevaError(f"{source}: {key} must be a list of dataset prefixes (or their .bin), found {value!r}")
            items += [(p, None, None, repeat, f"{source}: {key}[{i}]") for i, p in enumerate(paths)]
        return items, "N_ROUND"
    listed = data["datasets"]
    if not isinstance(listed, list) or not listed:
        raise NevaError(f"{source}: datasets must be a non-empty list of {{prefix, ratio, tokens}}, found {listed!r}")
    items = []
    for i, item in enumerate(listed):
        where = f"{source}: datasets[{i}]"
        if not isinstance(item, dict):
            raise NevaError(f"{where} must be a mapping with prefix and ratio, found {item!r}")
        _unknown(item, DATASET_KEYS, where)
        for key in ("prefix", "ratio"):
            if key not in item:
                raise NevaError(f"{where}: missing required key {key!r}")
        tokens = _count(item["tokens"], f"{where}.tokens") if "tokens" in item else None
        items.append((item["prefix"], _ratio(item["ratio"], f"{where}.ratio"), tokens, None, where))
    return items, "datasets"


def plan_from_dict(
    data: Any, *, source: str = "mixture config", base_dir: Path | None = None, check_prefixes: bool = True
) -> MixturePlan:
    """Validate a parsed mixture config (any form of ``FORMAT_HELP``) and compute the plan."""
    base = Path.cwd() if base_dir is None else base_dir
    if not isinstance(data, dict):
        raise NevaError(f"{source}: expected a mapping with keys {sorted(TOP_KEYS)}, found {type(data).__name__}")
    data, rounds = _canonical(data, source)
    _unknown(data, TOP_KEYS, source, also=f" (or NEO's {', '.join(ALIASES)} and N_ROUND lists)")
    for key in ("global_batch_size", "seq_length"):
        if key not in data:
            raise NevaError(f"{source}: missing required key {key!r} ({_SPELLING[key]} in NEO's spelling)")
    gbs = _count(data["global_batch_size"], f"{source}: global_batch_size")
    seq = _count(data["seq_length"], f"{source}: seq_length")
    items, form = _items(data, rounds, source)
    if "train_tokens" in data and "train_iters" in data:
        raise NevaError(f"{source}: give exactly one of train_tokens and train_iters, found both")
    if form != "N_ROUND" and "train_tokens" not in data and "train_iters" not in data:
        raise NevaError(f"{source}: give exactly one of train_tokens and train_iters (TRAIN_TOKENS/TRAIN_ITERS), "
                        "found neither")  # fmt: skip

    parsed: list[tuple[str, float, int, bool]] = []
    seen: dict[str, str] = {}
    for value, ratio, tokens, repeat, where in items:
        prefix = _resolve_prefix(value, base, f"{where}.prefix" if form == "datasets" else where)
        if prefix in seen:
            raise NevaError(f"{where} ({prefix}) is also {seen[prefix].removeprefix(source + ': ')}; list it once "
                            "(with the sum of its ratios)")  # fmt: skip
        seen[prefix] = where
        if check_prefixes:
            missing = [p for p in (f"{prefix}.bin", f"{prefix}.idx") if not Path(p).is_file()]
            if missing:
                raise NevaError(
                    f"{where}{'.prefix' if form == 'datasets' else ''} {value!r}: {' and '.join(missing)} not found; "
                    "check the path (relative paths are read from the config's folder) or run neva data preprocess"
                )
        counted = tokens is None
        if counted:
            tokens = count_tokens(prefix).tokens
            if tokens == 0:
                raise NevaError(f"{where}: dataset {prefix} holds no tokens; remove it from the mixture")
        # NEO: a dataset of N_ROUND supplies tokens × N; a DATA_PATH prefix without weight is weighted by its size.
        share = tokens * repeat if repeat is not None else tokens if ratio is None else ratio
        parsed.append((prefix, share, tokens, counted))

    requested = _count(data["train_tokens"], f"{source}: train_tokens") if "train_tokens" in data else None
    if "train_iters" in data:
        iters = _count(data["train_iters"], f"{source}: train_iters")
    else:
        if requested is None:  # N_ROUND without a length: every dataset repeated its N times
            requested = math.ceil(sum(share for _, share, _, _ in parsed))
        iters = -(-requested // (gbs * seq))  # ceil, in integers
    train_tokens = iters * gbs * seq

    total_ratio = sum(ratio for _, ratio, _, _ in parsed)
    if form == "datasets" and not math.isclose(total_ratio, 1.0, rel_tol=1e-6):
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
