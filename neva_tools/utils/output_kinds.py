"""Output kinds: what a command writes at its output path, and how an earlier output of that kind is recognised.

An existing path is replaced (``--overwrite``) only when it is such an earlier output, or an empty file or
directory: never an unrelated file, a directory of something else, a directory where a file goes or a file where
a directory goes. Recognisers read names and headers; only small files (a sentencepiece model, a JSON object under
8 MiB) are parsed whole. Used by ``neva_tools.utils.atomic``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from neva_tools.errors import NevaError

logger = logging.getLogger(__name__)

#: ``recognise(path)``: None when ``path`` (an existing, non-empty file or directory of the kind's type) is an
#: earlier output of the kind, else the reason it is not one (``"no config.json"``).
Recogniser = Callable[[Path], str | None]


@dataclass(frozen=True)
class OutputKind:
    """What a command writes at its output path: ``name`` (for messages), file or directory, and its recogniser."""

    name: str
    is_dir: bool
    recognise: Recogniser


# --- recognisers -----------------------------------------------------------------------------------------------

_JSON_PARSE_LIMIT = 8 << 20  # larger JSON objects are recognised by their first key
_SENTENCEPIECE_LIMIT = 64 << 20
_FIRST_KEY = re.compile(rb'\s*\{\s*"([^"\\]{1,200})"\s*:')
_MMAP_MAGIC = b"MMIDIDX\x00\x00"  # megatron-core's ``_INDEX_HEADER``


def _any_file(path: Path) -> str | None:
    return None


def _nemo(path: Path) -> str | None:
    """A tar holding ``model_config.yaml`` (headers only: the members' data are skipped)."""
    try:
        with tarfile.open(path, "r:*") as tar:
            if any(member.name.removeprefix("./") == "model_config.yaml" for member in tar):
                return None
    except (tarfile.TarError, OSError, EOFError):
        return "not a tar archive"
    return "a tar archive without model_config.yaml"


def _hf_model(path: Path) -> str | None:
    """``config.json`` and safetensors (or ``pytorch_model.bin``) weights, as ``save_pretrained`` writes them."""
    if not (path / "config.json").is_file():
        return "no config.json"
    if next(path.glob("*.safetensors"), None) is None and not (path / "pytorch_model.bin").is_file():
        return "config.json but no *.safetensors weights"
    return None


def _hf_tokenizer(path: Path) -> str | None:
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return "neither tokenizer.json nor tokenizer_config.json"
    return None


def _checkpoint_exports(path: Path) -> str | None:
    """Only ``step=N`` directories (and hidden temporaries of ``step=N``), as ``--all-checkpoints`` writes."""
    ours = re.compile(r"\.?step=\d+(\.tmp-.*|\.old-.*)?")
    other = sorted(p.name for p in path.iterdir() if not (ours.fullmatch(p.name) and p.is_dir()))
    if not other:
        return None
    return f"it holds {', '.join(other[:5])}{' …' if len(other) > 5 else ''}, not only step=N directories"


def _sentencepiece(path: Path) -> str | None:
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2

    if path.stat().st_size > _SENTENCEPIECE_LIMIT:
        return "too large for a sentencepiece model"
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except DecodeError:
        return "protobuf parse failed"
    return None if proto.pieces else "a protobuf message with no pieces"


def _mmap_idx(path: Path) -> str | None:
    with open(path, "rb") as fh:
        return None if fh.read(len(_MMAP_MAGIC)) == _MMAP_MAGIC else "no MMIDIDX header"


def _mmap_bin(path: Path) -> str | None:
    """Token data has no header: a ``.bin`` is ours when its ``.idx`` is a megatron index."""
    idx = path.with_suffix(".idx")
    return None if idx.is_file() and _mmap_idx(idx) is None else f"no megatron index {idx.name} beside it"


def json_object(*keys: str) -> Recogniser:
    """A recogniser of a JSON object holding ``keys`` (one above 8 MiB: its first key must be one of them)."""

    def recognise(path: Path) -> str | None:
        with open(path, "rb") as fh:
            head = fh.read(_JSON_PARSE_LIMIT + 1)
        if len(head) > _JSON_PARSE_LIMIT:
            first = _FIRST_KEY.match(head)
            return None if first and first.group(1).decode(errors="replace") in keys else "not such a JSON object"
        try:
            data = json.loads(head)
        except ValueError:
            return "not valid JSON"
        return _missing_keys(data, keys)

    return recognise


def jsonl_rows(*keys: str) -> Recogniser:
    """A recogniser of JSON lines whose first line is an object holding ``keys``."""

    def recognise(path: Path) -> str | None:
        with open(path, "rb") as fh:
            first = fh.readline(1 << 20)
        try:
            data = json.loads(first)
        except ValueError:
            return "its first line is not JSON"
        return _missing_keys(data, keys)

    return recognise


def _missing_keys(data: object, keys: tuple[str, ...]) -> str | None:
    if not isinstance(data, dict):
        return f"JSON {type(data).__name__}, not an object"
    missing = [k for k in keys if k not in data]
    return f"a JSON object without {', '.join(missing)}" if missing else None


# --- the kinds -------------------------------------------------------------------------------------------------

ANY_FILE = OutputKind("a file", False, _any_file)
NEMO_FILE = OutputKind("a .nemo file", False, _nemo)
HF_MODEL_DIR = OutputKind("a Hugging Face model directory", True, _hf_model)
HF_TOKENIZER_DIR = OutputKind("a Hugging Face tokenizer directory", True, _hf_tokenizer)
CHECKPOINT_EXPORTS_DIR = OutputKind("a directory of per-checkpoint exports (step=N)", True, _checkpoint_exports)
SENTENCEPIECE_MODEL = OutputKind("a sentencepiece model", False, _sentencepiece)
MMAP_BIN = OutputKind("a megatron .bin token file", False, _mmap_bin)
MMAP_IDX = OutputKind("a megatron .idx index", False, _mmap_idx)
PACK_PLAN = OutputKind("a packing plan (neva data pack)", False, json_object("max_seq_length", "fill_ratio", "bins"))
EVAL_REPORT = OutputKind("an eval report (neva eval)", False, json_object("model", "data", "records"))
EVAL_PREDICTIONS = OutputKind("eval predictions (neva eval)", False, jsonl_rows("id", "kind", "reference"))
ANSWERS = OutputKind("an answers file (neva generate)", False, jsonl_rows("id", "prompt", "answer"))


# --- checks ----------------------------------------------------------------------------------------------------


def describe(path: Path, limit: int = 10_000) -> str:
    """What is at an existing ``path``: ``a file of 10 bytes``, ``a directory with 1 file`` …"""
    mode = path.lstat().st_mode
    if stat.S_ISLNK(mode):
        return f"a symbolic link to {os.readlink(path)}"
    if stat.S_ISREG(mode):
        size = path.stat().st_size
        return f"a file of {size:,} byte{'s' * (size != 1)}" if size else "an empty file"
    if not stat.S_ISDIR(mode):
        return "a special file (not a regular file or directory)"
    files = 0
    for _, _, names in os.walk(path):
        files += len(names)
        if files > limit:
            return f"a directory with more than {limit:,} files"
    if files:
        return f"a directory with {files:,} file{'s' * (files != 1)}"
    return "a directory with subdirectories only" if any(path.iterdir()) else "an empty directory"


def _is_empty(path: Path) -> bool:
    return path.stat().st_size == 0 if path.is_file() else not any(path.iterdir())


def kind_problem(path: Path, kind: OutputKind) -> str | None:
    """None when an output of ``kind`` may replace what is at ``path`` (nothing or an earlier one), else what it is."""
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_symlink() or not (path.is_file() or path.is_dir()):
        return describe(path)
    if path.is_dir() != kind.is_dir:
        return f"{describe(path)}, not {kind.name}"
    try:
        reason = None if _is_empty(path) else kind.recognise(path)
    except OSError as exc:
        reason = f"unreadable: {exc.strerror or exc}"
    return None if reason is None else f"{describe(path)} that is not {kind.name} ({reason})"


def check_output_kind(path: Path, kind: OutputKind) -> None:
    """Refuse a ``path`` that holds something other than an earlier output of ``kind``."""
    problem = kind_problem(Path(path), kind)
    if problem is not None:
        raise NevaError(f"output {path} is {problem}; --overwrite only replaces an earlier output of this kind: "
                        "choose another path, or remove it yourself if it is no longer needed")  # fmt: skip


def check_output_path(path: Path, overwrite: bool, kind: OutputKind = ANY_FILE) -> None:
    """Refuse an existing output unless ``overwrite`` is set and it is an earlier output of ``kind``."""
    path = Path(path)
    check_output_kind(path, kind)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise NevaError(f"output {path} already exists; pass --overwrite to replace it, or choose another path")
