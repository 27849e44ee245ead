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
        self.config: dict[str, Any] = read_json_object(config, "the model's settings")
        self._files = self._weight_files()
        self._handles: dict[Path, Any] = {}
        self._meta: dict[str, tuple[Path, tuple[int, ...], torch.dtype | str]] = {}
        self._offsets: dict[str, int] = {}
        for file in sorted(set(self._files.values())):
            self._index(file)
        missing = sorted(n for n in self._files if n not in self._meta)
        if missing:
            raise NevaError(f"{self.path}: the weight index lists tensors that are not in their files: "
                            f"{', '.join(missing[:10])}; re-download the model")  # fmt: skip

    def _weight_files(self) -> dict[str, Path]:
        """name → file, from an index file or the single weights file."""
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = self.path / index_name
            if index.is_file():
                weight_map = read_json_object(index, "a weight_map of tensor names to weight files").get("weight_map")
                if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) and v and "/" not in v and "\\" not in v and v != ".."
                    for k, v in weight_map.items()
                ):  # fmt: skip
                    raise NevaError(f"{index} has no weight_map of tensor names to weight file names in this folder; "
                                    "re-download the model or remove the broken index")  # fmt: skip
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
            if not isinstance(state, dict):
                raise NevaError(f"{file} holds a {type(state).__name__}, not a dict of tensors; re-download it")
            for name, tensor in state.items():
                if not isinstance(tensor, torch.Tensor):
                    raise NevaError(f"{file}: {name!r} is a {type(tensor).__name__}, not a tensor; re-download it")
                stored = tensor.untyped_storage().nbytes()
                if tensor.numel() * tensor.element_size() > stored or any(
                    n > 1 and st == 0 for n, st in zip(tensor.shape, tensor.stride(), strict=True)
                ):  # an expanded or overlapping view: a tiny file that would expand into a huge tensor
                    raise NevaError(f"{file}: tensor {name} of shape {list(tensor.shape)} is a view with strides "
                                    f"{list(tensor.stride())} of a {stored}-byte storage, not stored weights; "
                                    "re-save the model with save_pretrained")  # fmt: skip
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

    def stored_dtype(self, name: str) -> str:
        """The dtype of tensor ``name`` as its file spells it (``F8_E4M3`` in safetensors, ``torch.int64``)."""
        return str(self._meta[name][2])

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


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON file that must hold an object (``what`` it should hold, for the message); any problem is our error
    naming the file."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise NevaError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); re-download it or save it "
                        "as UTF-8") from None  # fmt: skip
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, over-long numbers, deep nesting
        raise NevaError(f"{path} is not valid JSON ({str(exc)[:200]}); re-download it or fix it") from None
    except OSError as exc:
        raise NevaError(f"{path} cannot be read: {exc.strerror}") from None
    if not isinstance(value, dict):
        raise NevaError(f"{path} holds a JSON {type(value).__name__}, not an object with {what}; re-download it "
                        "or fix it")  # fmt: skip
    return value


def _safetensors_offsets(file: Path) -> dict[str, int]:
    """Byte offset of every tensor's data in a safetensors file (its header, already validated by ``safe_open``)."""
    with open(file, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    return {name: 8 + length + info["data_offsets"][0] for name, info in header.items() if name != "__metadata__"}
