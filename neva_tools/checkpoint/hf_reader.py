"""Reading Hugging Face checkpoints one tensor at a time (safetensors, sharded or not, or ``pytorch_model*.bin``).

Tensors are always read to CPU memory, whatever torch's default device.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from neva_tools.errors import NevaError

logger = logging.getLogger(__name__)

_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def resolve_hf_input(name_or_path: str, revision: str | None = None) -> Path:
    """A local directory as is, or a hub repo id fetched with ``huggingface_hub.snapshot_download``.

    ``HF_HUB_OFFLINE=1`` is honoured by ``huggingface_hub``: then only the local cache is used.
    """
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise NevaError(f"{name_or_path} is neither a model directory nor a hub repo id (organisation/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    logger.info("fetching %s (revision %s) from the hub", name_or_path, revision or "main")
    try:
        return Path(snapshot_download(name_or_path, revision=revision, allow_patterns=_DOWNLOAD_PATTERNS))
    except LocalEntryNotFoundError as exc:
        raise NevaError(f"{name_or_path} is not in the local hub cache and the hub is not reachable ({exc})") from None
    except HfHubHTTPError as exc:
        raise NevaError(f"could not download {name_or_path}: {exc}") from None


class HFCheckpoint:
    """The tensors and ``config.json`` of a local Hugging Face model directory, read lazily by name."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        config = self.path / "config.json"
        if not config.is_file():
            raise NevaError(f"{self.path} has no config.json: it is not a Hugging Face model directory")
        try:
            self.config: dict[str, Any] = json.loads(config.read_text())
        except json.JSONDecodeError as exc:
            raise NevaError(f"{config} is not valid JSON: {exc}") from None
        self._files = self._weight_files()
        self._handles: dict[Path, Any] = {}
        self._meta: dict[str, tuple[Path, tuple[int, ...], torch.dtype | str]] = {}
        self._offsets: dict[str, int] = {}
        for file in sorted(set(self._files.values())):
            self._index(file)
        missing = sorted(n for n in self._files if n not in self._meta)
        if missing:
            raise NevaError(f"the index lists tensors that are not in their files: {', '.join(missing[:10])}")

    def _weight_files(self) -> dict[str, Path]:
        """name → file, from an index file or the single weights file."""
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = self.path / index_name
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
                files = {name: self.path / file for name, file in weight_map.items()}
                for file in sorted(set(files.values())):
                    if not file.is_file():
                        raise NevaError(f"{index} lists {file.name}, which does not exist")
                return files
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (self.path / single).is_file():
                return {"": self.path / single}  # names filled in by _index
        raise NevaError(
            f"{self.path} holds no weights (model.safetensors[.index.json] or pytorch_model.bin[.index.json])"
        )

    def _index(self, file: Path) -> None:
        if file.suffix == ".safetensors":
            try:
                with safe_open(str(file), framework="pt", device="cpu") as handle:
                    for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                        sl = handle.get_slice(name)
                        self._meta[name] = (file, tuple(sl.get_shape()), sl.get_dtype())
            except SafetensorError as exc:
                raise NevaError(f"{file} is not a readable safetensors file ({exc}); re-download it") from None
            self._offsets.update(_safetensors_offsets(file))
        else:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # torch raises many types for corrupt/unsafe files
                raise NevaError(f"{file} could not be loaded safely (weights_only=True): {exc}") from None
            for name, tensor in state.items():
                self._meta[name] = (file, tuple(tensor.shape), tensor.dtype)
            self._handles[file] = state
        self._files.pop("", None)
        for name in self._meta:
            self._files.setdefault(name, file)

    def names(self) -> list[str]:
        """All tensor names, sorted."""
        return sorted(self._meta)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor ``name`` without reading it."""
        return self._meta[name][1]

    def dtype(self, name: str) -> torch.dtype | None:
        """The stored dtype of tensor ``name`` (None for a safetensors dtype torch has no name for here)."""
        dtype = self._meta[name][2]
        return dtype if isinstance(dtype, torch.dtype) else _SAFETENSORS_DTYPES.get(dtype)

    def location(self, name: str) -> tuple[str, int] | None:
        """(file, byte offset) of tensor ``name``'s bytes for a direct copy (safetensors files), else None."""
        offset = self._offsets.get(name)
        return None if offset is None or self.dtype(name) is None else (str(self._meta[name][0]), offset)

    def nbytes(self) -> int:
        """Bytes of all weight files (what a plain copy would move)."""
        return sum(f.stat().st_size for f in set(self._files.values()))

    def get(self, name: str, copy: bool = True) -> torch.Tensor:
        """Read tensor ``name``; with ``copy=False`` the tensor may be a view of the memory-mapped file.

        safetensors hands out tensors backed by the mapped file; their pages stay resident (and count
        against this process) for as long as such a tensor lives. The file is opened per read, so once
        the caller has copied what it needs (``copy=True`` does it here) the mapping goes away.
        """
        file = self._meta[name][0]
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt", device="cpu") as handle:
                    tensor = handle.get_tensor(name)
            else:
                tensor = self._handles[file][name]
            return tensor.clone() if copy else tensor
        except SafetensorError as exc:
            raise NevaError(f"reading {name} from {file} failed ({exc}); the file may be truncated") from None

    def close(self) -> None:
        """Release file handles."""
        self._handles.clear()

    def __enter__(self) -> HFCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _safetensors_offsets(file: Path) -> dict[str, int]:
    """Byte offset of every tensor's data in a safetensors file (its header, already validated by ``safe_open``)."""
    with open(file, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    return {name: 8 + length + info["data_offsets"][0] for name, info in header.items() if name != "__metadata__"}
