"""Read the tensors of a ``torch.save`` zip file one at a time: no ``torch.load``, no mmap, no unsafe pickle.

Why: repartitioning a multi-GB NeMo ``model_weights.ckpt`` only ever needs one tensor at a time, but
``torch.load`` reads every tensor, and ``torch.load(mmap=True)`` needs a real path (not a member of a
``.nemo`` tar) and keeps every page it touches mapped. ``LazyStateDict`` reads the zip's central directory
with ``zipfile`` (any seekable file object, e.g. ``TarFile.extractfile``), unpickles ``data.pkl`` into
``TensorRef`` records and, on ``d[key]``, seeks to that tensor's bytes in its ``<prefix>/data/<key>``
record and ``readinto``s a freshly allocated CPU tensor. Resident memory is what the caller keeps.

Safety model: ``data.pkl`` is unpickled by ``_SafeUnpickler``, whose ``find_class`` resolves only the
explicit allowlist ``_ALLOWED``; any other global refuses the file with a ``NevaError``. The tensor and
parameter rebuild functions are replaced by functions returning ``TensorRef`` records and the storage
classes by their dtypes, so nothing from the pickle constructs torch objects except ``torch.device`` and
dtypes. Storage records must be stored uncompressed; their CRCs are not checked (that means reading them).

Values: tensors (and parameters) come back as new contiguous CPU tensors, whatever torch's default device (a
model built under ``with torch.device("cuda")`` still reads to CPU memory; ``requires_grad`` is dropped);
``io.BytesIO`` values (Transformer-Engine ``_extra_state``) as their ``bytes``; ``None`` and other plain
values as is; nested dicts, lists and tuples with their tensors read.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import os
import pickle
import struct
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch

from neva_tools.errors import NevaError

_CHUNK = 64 << 20  # readinto chunk: bounds the transient copy a tar member's file object makes
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, 22 bytes, file name length, extra field length
_RESAVE = "re-save it with torch.save (the zip format, torch's default since 1.6)"
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # torch's pre-1.6 format starts with this pickle


@dataclass(frozen=True)
class StorageRef:
    """A ``<prefix>/data/<key>`` record named by a pickle persistent id; ``numel`` counts ``dtype`` items."""

    key: str
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class TensorRef:
    """A tensor as a view of a storage record: element offset, size and stride in ``dtype`` items."""

    storage: StorageRef
    dtype: torch.dtype
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.size) * self.dtype.itemsize

    def span(self) -> tuple[int, int]:
        """Byte range of the storage record that holds this view's elements ((0, 0) when it has none)."""
        if math.prod(self.size) == 0:
            return 0, 0
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride, strict=True))
        return self.offset * self.dtype.itemsize, (last + 1) * self.dtype.itemsize

    def contiguous_strides(self) -> tuple[int, ...]:
        """The row-major strides of ``size`` (what ``torch.save`` of a contiguous tensor records)."""
        strides, step = [], 1
        for n in reversed(self.size):
            strides.insert(0, step)
            step *= n
        return tuple(strides)

    def geometry_problem(self, record_bytes: int | None, *, contiguous: bool = True) -> str | None:
        """Why this view cannot be a stored weight, or None: its elements must be distinct elements of its
        storage (no stride-0 expansion, no overlap: never more elements than the storage holds), lie inside
        the storage, and with ``contiguous`` be in row-major order; the storage record must hold the storage.

        Checked from the pickle alone, before any data is read, so a tiny file cannot expand into a huge tensor.
        """
        storage_bytes = self.storage.numel * self.storage.dtype.itemsize
        numel = math.prod(self.size)
        if record_bytes is None:
            return f"its storage record data/{self.storage.key} is missing"
        if record_bytes < storage_bytes:
            return (f"its storage record data/{self.storage.key} holds {record_bytes} bytes but the storage "
                    f"needs {storage_bytes}")  # fmt: skip
        if numel == 0:
            return None
        if any(n > 1 and s == 0 for n, s in zip(self.size, self.stride, strict=True)):
            return f"it is a stride-0 (expanded) view of shape {list(self.size)} with strides {list(self.stride)}"
        if numel * self.dtype.itemsize > storage_bytes:
            return (f"its shape {list(self.size)} has {numel} elements but its storage holds only "
                    f"{storage_bytes // self.dtype.itemsize}")  # fmt: skip
        if self.span()[1] > storage_bytes:
            return (f"its view (offset {self.offset}, shape {list(self.size)}, strides {list(self.stride)}) "
                    f"reaches past the end of its storage ({storage_bytes} bytes)")  # fmt: skip
        wanted = self.contiguous_strides()
        if contiguous and any(n > 1 and s != w for n, s, w in zip(self.size, self.stride, wanted, strict=True)):
            return f"its strides {list(self.stride)} are not the contiguous {list(wanted)} of shape {list(self.size)}"
        return None


class _OpaqueBytes:
    """Stand-in for ``io.BytesIO``: keeps the buffer's bytes and nothing else."""

    data: bytes = b""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and state and isinstance(state[0], bytes):
            self.data = state[0]


def _rebuild_tensor(version: int, storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> TensorRef:
    """torch's ``_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])`` and
    ``_rebuild_tensor_v3(..., hooks, dtype[, metadata])`` (new dtypes, untyped storage), as a ``TensorRef``."""
    dtype = rest[2] if version == 3 else getattr(storage, "dtype", None)
    if not isinstance(storage, StorageRef) or not isinstance(dtype, torch.dtype):
        raise ValueError("a tensor record does not name a storage and a dtype")
    if len(rest) > version and rest[version]:
        raise ValueError(f"tensor metadata {rest[version]!r} (conjugate/negative-bit views) is not supported")
    size, stride = tuple(size), tuple(stride)
    if len(size) != len(stride) or not all(type(v) is int and v >= 0 for v in (offset, *size, *stride)):
        raise ValueError(f"bad tensor geometry: offset {offset!r}, size {size!r}, stride {stride!r}")
    return TensorRef(storage, dtype, offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: Any, hooks: Any, state: Any = None) -> Any:
    return data


def _latin1(text: Any, encoding: Any = "latin1") -> bytes:
    """``_codecs.encode`` as pickle protocol 2 uses it to spell ``bytes``; nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise ValueError("_codecs.encode is only allowed to turn a str into latin-1 bytes")
    return text.encode("latin1")


_STORAGES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}  # fmt: skip
_DTYPES = [*map(str, _STORAGES.values()), "torch.uint16", "torch.uint32", "torch.uint64", "torch.float8_e4m3fn",
           "torch.float8_e5m2", "torch.float8_e4m3fnuz", "torch.float8_e5m2fnuz", "torch.float8_e8m0fnu"]  # fmt: skip
_ALLOWED: dict[str, Any] = {
    "collections.OrderedDict": collections.OrderedDict,
    "torch._utils._rebuild_tensor_v2": functools.partial(_rebuild_tensor, 2),
    "torch._utils._rebuild_tensor_v3": functools.partial(_rebuild_tensor, 3),
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch.storage.UntypedStorage": torch.uint8,  # storage classes stand for their dtype (persistent ids only)
    "torch.UntypedStorage": torch.uint8,
    "torch.device": torch.device,
    "_codecs.encode": _latin1,
    "_io.BytesIO": _OpaqueBytes,
    "io.BytesIO": _OpaqueBytes,
    **{f"torch.{name}": dtype for name, dtype in _STORAGES.items()},
    **{name: getattr(torch, name.removeprefix("torch.")) for name in _DTYPES},
}


class _SafeUnpickler(pickle.Unpickler):
    """Resolves only ``_ALLOWED`` globals; storages become ``StorageRef`` records (no bytes are read)."""

    def __init__(self, file: BinaryIO, name: str) -> None:
        super().__init__(file, encoding="utf-8")
        self.name = name

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get(f"{module}.{name}")
        if found is None:
            raise NevaError(
                f"{self.name}: data.pkl references {module}.{name}, which is not a tensor, dict or known-safe "
                "value; the file is refused as unsafe (unpickling it could run arbitrary code)"
            )
        return found

    def persistent_load(self, pid: Any) -> StorageRef:
        valid = isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
        if not (valid and isinstance(pid[1], torch.dtype) and isinstance(pid[2], str) and type(pid[4]) is int):
            raise NevaError(f"{self.name}: data.pkl has an unknown persistent id {str(pid)[:80]}; the file is corrupt")
        return StorageRef(pid[2], pid[1], pid[4])


class LazyStateDict(Mapping[str, Any]):
    """A ``torch.save``d dict whose tensors are read from the file one at a time, on ``d[key]``.

    ``source`` is a path (opened and closed by this object) or a seekable binary file object (left open,
    e.g. ``TarFile.extractfile`` of a ``.nemo`` member); ``name`` is shown in errors. ``origin`` says where
    byte 0 of a file object lies on disk (a file and an offset, e.g. a member of an uncompressed tar), so
    that ``locate`` can name a tensor's bytes for a direct file-to-file copy; a path is its own origin.
    """

    def __init__(
        self, source: str | os.PathLike[str] | BinaryIO, name: str | None = None, origin: tuple[str, int] | None = None
    ) -> None:
        self._owned = isinstance(source, (str, os.PathLike))
        self.origin = origin
        if isinstance(source, (str, os.PathLike)):
            self.origin = (os.fspath(source), 0)
            self.name = name or os.fspath(source)
            try:
                self._file: BinaryIO = open(source, "rb")  # noqa: SIM115 - closed by close()
            except OSError as exc:
                raise NevaError(f"{self.name}: cannot open: {exc.strerror}") from None
        else:
            self.name = name or str(getattr(source, "name", "<stream>"))
            self._file = source
        self._offsets: dict[str, int] = {}
        try:
            self._entries, self._records = self._parse()
        except BaseException:
            self.close()
            raise

    def _parse(self) -> tuple[dict[str, Any], dict[str, zipfile.ZipInfo]]:
        try:
            zf = zipfile.ZipFile(self._file)
        except Exception as exc:
            with contextlib.suppress(OSError):
                self._file.seek(0)
            if self._file.read(len(_LEGACY_MAGIC)) == _LEGACY_MAGIC:
                raise NevaError(f"{self.name} is in torch's legacy pre-1.6 format, not a zip; {_RESAVE}") from None
            raise NevaError(f"{self.name} is not a torch zip file or is truncated ({exc}); {_RESAVE}") from None
        with zf:
            infos = {info.filename: info for info in zf.infolist()}
            pickles = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise NevaError(f"{self.name} is a zip file without a single <prefix>/data.pkl record; {_RESAVE}")
            prefix = pickles[0].removesuffix("data.pkl")
            try:
                order = zf.read(f"{prefix}byteorder").decode(errors="replace") if f"{prefix}byteorder" in infos else ""
                if order not in ("", "little"):
                    raise NevaError(f"{self.name} is {order!r}-endian; load it with torch.load and {_RESAVE}")
                with zf.open(pickles[0]) as fh:
                    obj = _SafeUnpickler(fh, self.name).load()  # type: ignore[arg-type]
            except NevaError:
                raise
            except Exception as exc:
                raise NevaError(f"{self.name}: data.pkl is corrupt or truncated ({exc!r})") from None
        if not isinstance(obj, dict):
            raise NevaError(f"{self.name} holds a {type(obj).__name__}, not a dict of tensors")
        records = {n.removeprefix(prefix + "data/"): i for n, i in infos.items() if n.startswith(prefix + "data/")}
        for key, info in records.items():
            if info.compress_type != zipfile.ZIP_STORED:
                raise NevaError(f"{self.name}: storage record data/{key} is compressed; {_RESAVE}")
        return obj, records

    def close(self) -> None:
        """Close the file if this object opened it."""
        if self._owned:
            self._file.close()

    def __enter__(self) -> LazyStateDict:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __getitem__(self, key: str) -> Any:
        """The value of ``key``; a tensor is read from the file now, into a new contiguous CPU tensor."""
        return self._materialize(self._entries[key])

    def __repr__(self) -> str:
        return f"LazyStateDict({self.name!r}, {len(self)} entries)"

    def is_tensor(self, key: str) -> bool:
        return isinstance(self._entries[key], TensorRef)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._ref(key).size

    def dtype(self, key: str) -> torch.dtype:
        return self._ref(key).dtype

    def nbytes(self, key: str) -> int:
        return self._ref(key).nbytes

    def geometry_problem(self, key: str, *, contiguous: bool = True) -> str | None:
        """Why tensor ``key`` cannot be a stored weight (``TensorRef.geometry_problem``), or None; reads no data."""
        ref = self._ref(key)
        info = self._records.get(ref.storage.key)
        return ref.geometry_problem(None if info is None else info.file_size, contiguous=contiguous)

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (dim 0) of tensor ``key``, reading only their bytes."""
        ref = self._ref(key)
        if not ref.size or not 0 <= start <= stop <= ref.size[0]:
            raise ValueError(f"rows {start}:{stop} out of range for {key} of shape {ref.size}")
        offset = ref.offset + start * ref.stride[0]
        return self._read(TensorRef(ref.storage, ref.dtype, offset, (stop - start, *ref.size[1:]), ref.stride))

    def locate(self, key: str) -> tuple[str, int] | None:
        """(file, byte offset) of tensor ``key``'s bytes on disk when they are stored contiguously, else None.

        Needs a known ``origin``; the storage record must hold the whole tensor (as ``torch.save`` writes it).
        """
        ref = self._ref(key)
        start, end = ref.span()
        info = self._records.get(ref.storage.key)
        if self.origin is None or info is None or end > info.file_size or end - start != ref.nbytes:
            return None
        expected = ref.contiguous_strides()
        if any(n > 1 and s != e for n, s, e in zip(ref.size, ref.stride, expected, strict=True)):
            return None
        return self.origin[0], self.origin[1] + self._data_offset(ref.storage.key, info) + start

    def _ref(self, key: str) -> TensorRef:
        value = self._entries[key]
        if not isinstance(value, TensorRef):
            raise NevaError(f"{self.name}: {key!r} is a {type(value).__name__}, not a tensor")
        return value

    def _materialize(self, value: Any) -> Any:
        if isinstance(value, StorageRef):  # a storage saved on its own: read as a 1-D tensor
            value = TensorRef(value, value.dtype, 0, (value.numel,), (1,))
        if isinstance(value, TensorRef):
            return self._read(value)
        if isinstance(value, _OpaqueBytes):
            return value.data
        if isinstance(value, dict):
            return type(value)((k, self._materialize(v)) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return type(value)(self._materialize(v) for v in value)
        return value

    def _read(self, ref: TensorRef) -> torch.Tensor:
        start, end = ref.span()
        if start == end:
            return torch.empty(ref.size, dtype=ref.dtype, device="cpu")
        key = ref.storage.key
        info = self._records.get(key)
        if info is None or end > info.file_size:
            raise NevaError(f"{self.name}: storage record data/{key} is missing or too short; the file is corrupt")
        buf = torch.empty(end - start, dtype=torch.uint8, device="cpu")  # never the default device: .numpy()
        view, done = memoryview(buf.numpy()), 0
        try:
            self._file.seek(self._data_offset(key, info) + start)
            while done < len(view):
                n = self._file.readinto(view[done : done + _CHUNK])  # type: ignore[attr-defined]
                if not n:
                    raise NevaError(f"{self.name}: the file ends inside storage record data/{key}; it is truncated")
                done += n
        except OSError as exc:
            raise NevaError(f"{self.name}: reading storage record data/{key} failed: {exc}") from None
        return buf.view(ref.dtype).as_strided(ref.size, ref.stride).contiguous()

    def _data_offset(self, key: str, info: zipfile.ZipInfo) -> int:
        """Where a record's bytes start: after its local header, whose extra field differs from the central one."""
        if key not in self._offsets:
            self._file.seek(info.header_offset)
            header = self._file.read(_LOCAL_HEADER.size)
            if len(header) != _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
                raise NevaError(f"{self.name}: bad local zip header for data/{key}; the file is corrupt or truncated")
            _, name_len, extra_len = _LOCAL_HEADER.unpack(header)
            self._offsets[key] = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        return self._offsets[key]
