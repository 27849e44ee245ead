"""The NeMo-1 ``.nemo`` archive: an uncompressed tar with ``model_config.yaml``, weights and artifacts.

``NemoWriter`` streams members straight into the tar (a member's header is patched with its size once
the member is written), so a torch-saved state dict goes to disk once, with no temporary copy; the
archive itself is written to a temporary name and renamed when complete. ``NemoArchive`` reads tar
files and extracted directories alike and refuses members that would escape an extraction directory.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tarfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO, Any

import torch
import yaml

from neva_tools.checkpoint.torch_lazy import LazyStateDict
from neva_tools.errors import NevaError
from neva_tools.utils.atomic import atomic_path

CONFIG_NAME = "model_config.yaml"
WEIGHTS_NAME = "model_weights.ckpt"
DIST_DIR = "model_weights"
_BLOCK = tarfile.BLOCKSIZE


def weights_member(tp_rank: int, tp: int, pp_rank: int = 0, pp: int = 1) -> str:
    """NeMo's member name for one rank's legacy weights."""
    if pp > 1:
        return f"tp_rank_{tp_rank:02d}_pp_rank_{pp_rank:03d}/{WEIGHTS_NAME}"
    if tp > 1:
        return f"mp_rank_{tp_rank:02d}/{WEIGHTS_NAME}"
    return WEIGHTS_NAME


def artifact_name(basename: str) -> str:
    """A fresh NeMo artifact member name: ``<32 hex>_<basename>``."""
    return f"{uuid.uuid4().hex}_{basename}"


class _CountingWriter(io.RawIOBase):
    """A write-only file object that forwards to the archive and counts bytes.

    Forward seeks (``torch.save`` under ``skip_data`` seeks over the tensor bytes it leaves out) are
    passed on too, so the member may hold holes that are filled in later by offset.
    """

    def __init__(self, fh: IO[bytes]) -> None:
        self._fh = fh
        self._start = fh.tell()
        self.count = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._fh.tell() - self._start

    def seek(self, pos: int, whence: int = 0) -> int:
        target = {0: pos, 1: self.tell() + pos, 2: self.count + pos}[whence]
        if target < 0:
            raise ValueError(f"negative seek position {target}")
        self._fh.seek(self._start + target)
        self.count = max(self.count, target)
        return target

    def write(self, data: Any) -> int:
        n = self._fh.write(data)
        self.count = max(self.count, self.tell())
        return n


class _MemberReader(io.RawIOBase):
    """A seekable read-only window onto one member of an uncompressed tar, read straight from the file.

    ``TarFile.extractfile`` copies every read through an intermediate buffer; this reads into the
    caller's buffer directly.
    """

    def __init__(self, path: Path, offset: int, size: int) -> None:
        self._fh = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        self._offset, self._size, self._pos = offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._size - self._pos))
        if n == 0:
            return 0
        self._fh.seek(self._offset + self._pos)
        got = self._fh.readinto(view[:n]) or 0
        self._pos += got
        return got

    def close(self) -> None:
        self._fh.close()
        super().close()


class NemoWriter:
    """Write a ``.nemo`` tar member by member; the archive appears at its path only when complete."""

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        self.path = Path(path)
        self._atomic = atomic_path(self.path, overwrite=overwrite)
        self._fh: IO[bytes] | None = None
        self._dirs: set[str] = set()
        self.tmp_path: Path | None = None
        #: member name → (offset of its first data byte in the archive file, size)
        self.members: dict[str, tuple[int, int]] = {}

    def __enter__(self) -> NemoWriter:
        self.tmp_path = self._atomic.__enter__()
        self._fh = open(self.tmp_path, "wb")
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool | None:
        assert self._fh is not None
        try:
            if exc_type is None:
                self._fh.write(b"\0" * (2 * _BLOCK))
                self._fh.flush()
                os.fsync(self._fh.fileno())
        finally:
            self._fh.close()
        return self._atomic.__exit__(exc_type, exc, tb)

    def _header(self, name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.type = size, int(time.time()), kind
        info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
        return info.tobuf(format=tarfile.GNU_FORMAT)

    def _ensure_parents(self, name: str) -> None:
        assert self._fh is not None
        for parent in reversed(PurePosixPath(name).parents[:-1]):
            key = str(parent)
            if key not in self._dirs:
                self._dirs.add(key)
                self._fh.write(self._header(key + "/", 0, tarfile.DIRTYPE))

    @contextmanager
    def stream(self, name: str) -> Iterator[IO[bytes]]:
        """Yield a binary file object whose bytes become member ``name``."""
        assert self._fh is not None, "use NemoWriter as a context manager"
        self._ensure_parents(name)
        start = self._fh.tell()
        placeholder = self._header(name, 0)
        self._fh.write(placeholder)
        writer = _CountingWriter(self._fh)
        yield writer  # type: ignore[misc]
        size = writer.count
        self.members[name] = (writer._start, size)
        self._fh.seek(writer._start + size)
        self._fh.write(b"\0" * (-size % _BLOCK))
        end = self._fh.tell()
        header = self._header(name, size)
        assert len(header) == len(placeholder)
        self._fh.seek(start)
        self._fh.write(header)
        self._fh.seek(end)

    def add_bytes(self, name: str, data: bytes) -> None:
        """Add a member with the given content."""
        with self.stream(name) as fh:
            fh.write(data)

    def add_yaml(self, name: str, obj: Any) -> None:
        """Add a YAML member (e.g. ``model_config.yaml``)."""
        self.add_bytes(name, yaml.safe_dump(obj, sort_keys=False).encode())

    def add_file(self, name: str, src: str | os.PathLike) -> None:
        """Copy a file into the archive as member ``name``."""
        with open(src, "rb") as fin, self.stream(name) as fout:
            shutil.copyfileobj(fin, fout, 16 << 20)

    def add_dir(self, name: str, src: str | os.PathLike) -> None:
        """Copy a directory tree into the archive under ``name``."""
        src = Path(src)
        for item in sorted(src.rglob("*")):
            if item.is_file():
                self.add_file(f"{name}/{item.relative_to(src).as_posix()}", item)

    def add_torch(self, name: str, obj: Any) -> None:
        """``torch.save`` an object straight into the archive."""
        with self.stream(name) as fh:
            torch.save(obj, fh)

    def add_torch_skeleton(self, name: str, specs: Mapping[str, tuple[Sequence[int], torch.dtype]]) -> dict[str, int]:
        """Add a ``torch.save``d dict of tensors with the given (shape, dtype) whose bytes are left as holes.

        Returns each tensor's byte offset in the archive file; write the bytes there (``fileno``) before the
        archive is closed. The result loads with ``torch.load`` like any state dict; the zip CRC of the
        tensor records is 0, as ``torch.save`` writes it under ``skip_data`` or ``set_crc32_options(False)``.
        The stand-in tensors are allocated but never touched, so they take address space, not memory.
        """
        deterministic = torch.utils.deterministic
        fill, deterministic.fill_uninitialized_memory = deterministic.fill_uninitialized_memory, False
        try:
            blank = {key: torch.empty(tuple(shape), dtype=dtype) for key, (shape, dtype) in specs.items()}
        finally:
            deterministic.fill_uninitialized_memory = fill
        with self.stream(name) as fh, torch.serialization.skip_data():
            torch.save(blank, fh)
        del blank
        assert self._fh is not None and self.tmp_path is not None
        self._fh.flush()
        start, size = self.members[name]
        reader = io.BufferedReader(_MemberReader(self.tmp_path, start, size), 1 << 16)
        try:
            lazy = LazyStateDict(reader, name=f"{self.path}:{name}", origin=(str(self.tmp_path), start))
            located = {key: lazy.locate(key) for key in specs}
        finally:
            reader.close()
        offsets = {key: where[1] for key, where in located.items() if where is not None}
        assert len(offsets) == len(specs), f"torch.save did not store every tensor of {name} contiguously"
        return offsets

    def fileno(self) -> int:
        """The archive file's descriptor, for writing into holes by offset (buffered writes flushed first)."""
        assert self._fh is not None, "use NemoWriter as a context manager"
        self._fh.flush()
        return self._fh.fileno()


_RANK_RE = re.compile(r"^(?:mp_rank_(\d+)|tp_rank_(\d+)_pp_rank_(\d+))/" + re.escape(WEIGHTS_NAME) + "$")


def _is_compressed(path: Path) -> bool:
    """True for a gzip/bzip2/xz-compressed tar (older ``.nemo`` files), which cannot be read by offset."""
    with open(path, "rb") as fh:
        head = fh.read(6)
    return head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ"))


def _safe_name(name: str, archive: Path) -> str:
    """Normalise a member name; refuse absolute paths and ``..`` (tar-slip)."""
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts:
        raise NevaError(f"{archive}: member {name!r} would escape the extraction directory; refusing this archive")
    return "/".join(p for p in pure.parts if p != ".")


class NemoArchive:
    """Read a ``.nemo`` file (tar) or an extracted ``.nemo`` directory."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        self._open_files: list[IO[bytes]] = []
        self._compressed = False
        if self.path.is_dir():
            names = [p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file()]
        elif self.path.is_file():
            try:
                self._tar = tarfile.open(self.path, "r:*")  # noqa: SIM115 - closed by close()
                infos = self._tar.getmembers()
                self._compressed = _is_compressed(self.path)
            except (tarfile.TarError, EOFError) as exc:
                raise NevaError(f"{self.path} is not a readable .nemo archive (tar error: {exc}); "
                                "it may be truncated — copy or download it again") from None  # fmt: skip
            for info in infos:
                name = _safe_name(info.name, self.path)
                if info.issym() or info.islnk():
                    raise NevaError(f"{self.path}: member {info.name!r} is a link; .nemo archives hold only files")
                if info.isfile():
                    self._members[name] = info
            names = list(self._members)
        else:
            raise NevaError(f"{self.path} does not exist")
        self.names = sorted(names)
        if CONFIG_NAME not in self.names:
            raise NevaError(f"{self.path} has no {CONFIG_NAME}: it is not a .nemo checkpoint")

    def __enter__(self) -> NemoArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the underlying tar file and the members opened for lazy reading."""
        for fh in self._open_files:
            fh.close()
        self._open_files.clear()
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    @contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        """Open member ``name`` for reading."""
        if name not in self.names:
            raise NevaError(f"{self.path} has no member {name!r}")
        if self._tar is None:
            with open(self.path / name, "rb") as fh:
                yield fh
            return
        fh = self._tar.extractfile(self._members[name])
        assert fh is not None
        with fh:
            yield fh

    def read_config(self) -> dict[str, Any]:
        """The parsed ``model_config.yaml`` (a plain dict; interpolations are kept as strings)."""
        with self.open(CONFIG_NAME) as fh:
            try:
                cfg = yaml.safe_load(fh)
            except yaml.YAMLError as exc:
                raise NevaError(f"{self.path}: {CONFIG_NAME} is not valid YAML: {exc}") from None
        if not isinstance(cfg, dict):
            raise NevaError(f"{self.path}: {CONFIG_NAME} is not a mapping")
        return cfg

    @property
    def layout(self) -> str:
        """``dist`` for a megatron-core distributed checkpoint, ``legacy`` for ``model_weights.ckpt`` files."""
        if any(n.startswith(DIST_DIR + "/") for n in self.names):
            return "dist"
        if WEIGHTS_NAME in self.names or any(_RANK_RE.match(n) for n in self.names):
            return "legacy"
        raise NevaError(f"{self.path} holds no weights ({WEIGHTS_NAME}, mp_rank_XX/ or {DIST_DIR}/)")

    def legacy_ranks(self) -> tuple[int, int]:
        """(tp, pp) of a legacy archive, from its rank directories; gaps are an error naming the missing one."""
        if WEIGHTS_NAME in self.names:
            return 1, 1
        found = set()
        for name in self.names:
            m = _RANK_RE.match(name)
            if m:
                found.add((int(m.group(1)), 0) if m.group(1) is not None else (int(m.group(2)), int(m.group(3))))
        tp = max(t for t, _ in found) + 1
        pp = max(p for _, p in found) + 1
        for t in range(tp):
            for p in range(pp):
                if (t, p) not in found:
                    raise NevaError(f"{self.path} is missing the weights of TP rank {t}, PP rank {p}")
        return tp, pp

    def load_legacy(self, tp_rank: int = 0, pp_rank: int = 0) -> dict[str, torch.Tensor]:
        """One rank's legacy state dict, loaded with ``weights_only=True``."""
        tp, pp = self.legacy_ranks()
        name = weights_member(tp_rank, tp, pp_rank, pp)
        with self.open(name) as fh:
            try:
                return torch.load(fh, map_location="cpu", weights_only=True)
            except Exception as exc:  # torch raises many types for corrupt or unsafe files
                raise NevaError(f"{self.path}: {name} could not be loaded (weights_only=True): {exc}") from None

    def lazy_legacy(self, tp_rank: int = 0, pp_rank: int = 0) -> LazyStateDict:
        """One rank's legacy weights as a ``LazyStateDict``: tensors are read one at a time, on access."""
        tp, pp = self.legacy_ranks()
        name = weights_member(tp_rank, tp, pp_rank, pp)
        origin = None
        if self._tar is None:
            fh: IO[bytes] = open(self.path / name, "rb")  # noqa: SIM115 - closed by close()
            origin = (str(self.path / name), 0)
        elif not self._compressed:
            info = self._members[name]
            fh = io.BufferedReader(_MemberReader(self.path, info.offset_data, info.size), 1 << 16)
            origin = (str(self.path), info.offset_data)
        else:
            extracted = self._tar.extractfile(self._members[name])
            assert extracted is not None
            fh = extracted
        self._open_files.append(fh)
        return LazyStateDict(fh, name=f"{self.path}:{name}", origin=origin)

    def other_members(self) -> list[str]:
        """Members that are neither the config nor weights (tokenizer and other artifacts)."""
        return [
            n for n in self.names
            if n != CONFIG_NAME and n != WEIGHTS_NAME and not _RANK_RE.match(n) and not n.startswith(DIST_DIR + "/")
        ]  # fmt: skip

    def extract(self, prefix: str, dest: str | os.PathLike) -> Path:
        """Extract member ``prefix`` (a file) or every member under ``prefix/`` into ``dest``; return the path."""
        dest = Path(dest)
        selected = [n for n in self.names if n == prefix or n.startswith(prefix.rstrip("/") + "/")]
        if not selected:
            raise NevaError(f"{self.path} has no member {prefix!r}")
        for name in selected:
            target = (dest / name).resolve()
            if not target.is_relative_to(dest.resolve()):
                raise NevaError(f"{self.path}: member {name!r} would escape {dest}; refusing to extract")
            target.parent.mkdir(parents=True, exist_ok=True)
            with self.open(name) as fin, open(target, "wb") as fout:
                shutil.copyfileobj(fin, fout, 16 << 20)
        return dest / prefix

    def artifact(self, ref: str, dest: str | os.PathLike) -> Path:
        """Extract a ``nemo:<name>`` artifact reference (a file or a directory) into ``dest``."""
        if not ref.startswith("nemo:"):
            raise NevaError(f"{ref!r} is not a nemo: artifact reference")
        return self.extract(ref[len("nemo:") :], dest)
