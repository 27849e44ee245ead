"""Writing a NeMo-1 ``.nemo`` tar member by member (the reader and member names: ``nemo_archive``).

``NemoWriter`` streams members straight into the tar (a member's header is patched with its size once
the member is written), so a torch-saved state dict goes to disk once, with no temporary copy; the
archive itself is written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tarfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO, Any

import torch
import yaml

from neva_tools.checkpoint.nemo_archive import MemberReader
from neva_tools.checkpoint.torch_lazy import LazyStateDict
from neva_tools.utils.atomic import NEMO_FILE, atomic_path

_BLOCK = tarfile.BLOCKSIZE


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


class NemoWriter:
    """Write a ``.nemo`` tar member by member; the archive appears at its path only when complete.

    An existing path is replaced (``overwrite``) only when it is a ``.nemo`` (``atomic.NEMO_FILE``).
    """

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        self.path = Path(path)
        self._atomic = atomic_path(self.path, kind=NEMO_FILE, overwrite=overwrite)
        self._fh: IO[bytes] | None = None
        self._dirs: set[str] = set()
        self.tmp_path: Path | None = None
        #: member name → (offset of its first data byte in the archive file, size)
        self.members: dict[str, tuple[int, int]] = {}

    def __enter__(self) -> NemoWriter:
        self.tmp_path = self._atomic.__enter__()
        try:
            self._fh = open(self.tmp_path, "wb")
        except BaseException as error:
            self._atomic.__exit__(type(error), error, error.__traceback__)  # removes the temporary
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool | None:
        assert self._fh is not None
        failed: BaseException | None = None
        try:
            if exc_type is None:
                self._fh.write(b"\0" * (2 * _BLOCK))
                self._fh.flush()
                os.fsync(self._fh.fileno())
                self._fh.close()
        except BaseException as error:  # a full disk: the temporary is still removed (by atomic_path)
            failed = error
        finally:
            with contextlib.suppress(OSError):  # after a failed write, closing flushes the buffer and fails again
                self._fh.close()
        if failed is None:
            return self._atomic.__exit__(exc_type, exc, tb)
        self._atomic.__exit__(type(failed), failed, failed.__traceback__)  # raises our error for a full disk
        raise failed

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
            blank = {key: torch.empty(tuple(shape), dtype=dtype, device="cpu") for key, (shape, dtype) in specs.items()}
        finally:
            deterministic.fill_uninitialized_memory = fill
        with self.stream(name) as fh, torch.serialization.skip_data():
            torch.save(blank, fh)
        del blank
        assert self._fh is not None and self.tmp_path is not None
        self._fh.flush()
        start, size = self.members[name]
        reader = io.BufferedReader(MemberReader(self.tmp_path, start, size), 1 << 16)
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
