"""Read megatron-core ``torch_dist`` checkpoints without running code stored in them.

A ``torch_dist`` directory (``model_weights/`` of a dist ``.nemo``, a training checkpoint) has four kinds of
files: ``metadata.json`` (JSON), ``.metadata`` (a pickle of ``torch.distributed.checkpoint`` dataclasses),
``*.distcp`` (tensors, and ``torch.save``'d byte items) and ``common.pt`` / sharded-object ``*.pt`` files
(``torch.save``). Out of the box three readers unpickle with no restriction: torch's
``FileSystemReader.read_metadata`` calls ``pickle.load``, ``DefaultLoadPlanner.load_bytes`` calls
``torch.load(weights_only=False)``, and megatron-core's common strategy calls ``torch.load`` with the
process's default, which the ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` environment variable turns off.

``install()`` (idempotent, applied on CUDA and CPU alike) replaces the first two with readers that accept
only what the format needs: an allow-list unpickler for ``.metadata`` and ``weights_only=True`` for byte
items. ``check_directory()`` is what every reading path calls first: it validates ``metadata.json``,
unpickles ``.metadata`` through the allow-list and loads every ``*.pt`` with ``weights_only=True``, so a
refused file stops the command with a ``NevaError`` naming the file and the class it tried to load, before
megatron-core reads anything (and on every rank alike, with no collective in flight).
"""

from __future__ import annotations

import contextlib
import enum
import io
import json
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

from neva_tools.errors import NevaError

#: The backends of ``metadata.json`` that this tool reads (megatron-core's default since NeMo 1.23).
SHARDED_BACKENDS = ("torch_dist",)
COMMON_BACKENDS = ("torch",)

_DCP = "torch.distributed.checkpoint"
#: Classes that ``torch.distributed.checkpoint`` writes into ``.metadata`` (dataclasses and enums, built
#: from their fields; none runs code of the file's choosing).
_METADATA_CLASSES = {
    f"{_DCP}.metadata": ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                         "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"),
    f"{_DCP}.planner": ("SavePlan", "LoadPlan", "WriteItem", "WriteItemType", "ReadItem", "LoadItemType",
                        "TensorWriteData", "BytesIOWriteData"),
    f"{_DCP}.filesystem": ("_StorageInfo",),
    "torch.serialization": ("_get_layout",),  # torch.layout by name: a dictionary lookup
    "torch": ("Size",),
    "builtins": ("set", "frozenset", "slice"),
    "collections": ("OrderedDict",),
}  # fmt: skip


def _allowed(module: str, name: str) -> bool:
    if name in _METADATA_CLASSES.get(module, ()):
        return True
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


class RefusedClass(pickle.UnpicklingError):
    """A pickle asked for a global outside the allow-list."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.qualname = f"{module}.{name}"


def _enum_member(cls: Any, name: Any) -> Any:
    """``getattr`` as newer Pythons pickle enum members (``getattr(WriteItemType, "TENSOR")``): only a member of an
    allow-listed enum."""
    if (isinstance(cls, type) and issubclass(cls, enum.Enum) and _allowed(cls.__module__, cls.__qualname__)
            and isinstance(name, str) and name in cls.__members__):  # fmt: skip
        return cls[name]
    raise RefusedClass("builtins", f"getattr({getattr(cls, '__qualname__', type(cls).__name__)}, {name!r})")


class MetadataUnpickler(pickle.Unpickler):
    """An unpickler that builds only the ``torch.distributed.checkpoint`` metadata classes (and their enum members)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("builtins", "getattr"):
            return _enum_member
        if not _allowed(module, name):
            raise RefusedClass(module, name)
        return super().find_class(module, name)


def load_metadata(stream: IO[bytes], where: str) -> Any:
    """Unpickle a ``.metadata`` stream through the allow-list; a refused or broken file is a ``NevaError``."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        metadata = MetadataUnpickler(stream).load()
    except RefusedClass as exc:
        raise NevaError(
            f"{where} tries to load {exc.qualname}, which a checkpoint's metadata never holds; refusing to read it "
            "(the file is corrupt or was made to run code: get the checkpoint again from a source you trust)"
        ) from None
    except Exception as exc:  # truncated or garbled pickles raise many types
        raise NevaError(f"{where} is not a readable checkpoint metadata file ({type(exc).__name__}: {exc})") from None
    if not isinstance(metadata, Metadata):
        raise NevaError(f"{where} holds a {type(metadata).__name__}, not torch.distributed.checkpoint Metadata")
    return metadata


def weights_only_load(source: str | Path | IO[bytes], where: str) -> Any:
    """``torch.load(weights_only=True)`` to CPU; a refused or broken file is a ``NevaError`` naming it."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"tries to load {found.group(1)}, which" if found else "holds an object that"
        raise NevaError(f"{where} {what} a checkpoint never holds; refusing to read it (weights_only=True): "
                        "get the checkpoint again from a source you trust") from None  # fmt: skip
    except Exception as exc:
        raise NevaError(f"{where} could not be loaded ({type(exc).__name__}: {exc})") from None


def _read_metadata(self: Any, *args: Any, **kwargs: Any) -> Any:
    """``FileSystemReader.read_metadata`` through the allow-list unpickler (otherwise torch's own steps)."""
    from torch.distributed.checkpoint.metadata import StorageMeta

    path = self._get_metadata_path(kwargs.get("rank"))
    with self.fs.create_stream(path, "rb") as stream:
        metadata = load_metadata(stream, str(path))
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    metadata.storage_meta.load_id = self.load_id
    return metadata


def _load_bytes(self: Any, read_item: Any, value: io.BytesIO) -> None:
    """``DefaultLoadPlanner.load_bytes`` with ``weights_only=True``."""
    from torch.distributed.checkpoint._traverse import set_element

    fqn = read_item.dest_index.fqn
    obj = weights_only_load(value, f"checkpoint item {fqn!r}")
    if self.flatten_state_dict:
        set_element(self.original_state_dict, self.mappings[fqn], obj)
    else:
        self.state_dict[fqn] = obj


@contextlib.contextmanager
def refusals_unwrapped() -> Iterator[None]:
    """Re-raise a ``NevaError`` that torch's checkpoint loader wrapped into its ``CheckpointException``.

    torch collects every rank's failure into one ``CheckpointException`` (a ``BaseException`` with each
    rank's traceback); a refusal of ours inside it is a user error and is shown as one.
    """
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as exc:
        for failure in exc.failures.values():
            inner = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(inner, NevaError):
                raise NevaError(str(inner)) from None
        raise


_installed = False


def install() -> None:
    """Route torch's ``.metadata`` and byte-item readers through the allow-lists (once per process)."""
    global _installed
    if _installed:
        return
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    FileSystemReader.read_metadata = _read_metadata
    DefaultLoadPlanner.load_bytes = _load_bytes
    _installed = True


def _backends(directory: Path, where: str) -> None:
    path = directory / "metadata.json"
    try:
        found = json.loads(path.read_text())
    except FileNotFoundError:
        raise NevaError(f"{where} has no metadata.json: it is not a megatron-core dist checkpoint") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NevaError(f"{where}/metadata.json is not valid JSON ({exc})") from None
    if not isinstance(found, dict):
        raise NevaError(f"{where}/metadata.json holds {type(found).__name__}, not megatron-core's backend record")
    for key, known in (("sharded_backend", SHARDED_BACKENDS), ("common_backend", COMMON_BACKENDS)):
        value = found.get(key, "torch" if key == "common_backend" else None)
        if value not in known:
            raise NevaError(f"{where}/metadata.json names {key} {value!r}; this tool reads {' and '.join(known)} "
                            "checkpoints (megatron-core's default): re-save it as torch_dist")  # fmt: skip


def check_directory(directory: str | Path, where: str | None = None) -> None:
    """Validate a ``torch_dist`` directory before megatron-core reads it (see the module docstring).

    ``where`` names the directory in messages (e.g. ``model.nemo:model_weights``); the files' own paths
    are used when it is not given.
    """
    install()
    directory = Path(directory)
    where = where or str(directory)
    _backends(directory, where)
    metadata = directory / ".metadata"
    if not metadata.is_file():
        raise NevaError(f"{where} has no .metadata: the dist checkpoint is incomplete (was its save interrupted?)")
    with open(metadata, "rb") as stream:
        load_metadata(stream, f"{where}/.metadata")
    for path in sorted(directory.rglob("*.pt")):
        weights_only_load(path, f"{where}/{path.relative_to(directory).as_posix()}")
