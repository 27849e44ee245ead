"""Writing tensor bytes into an output file by offset: file-to-file range copies and in-memory tensors.

Streaming conversions lay out every output tensor first (``NemoWriter.add_torch_skeleton``) and then
fill the bytes in. Bytes that already lie on disk in the right order (a safetensors tensor, a row range
of a torch-saved shard) are copied with ``os.copy_file_range``: the kernel moves them from the page
cache to the output without a trip through this process, as ``cp`` does. Where that is not possible
(another file system, an old kernel) the copy falls back to ``pread``/``pwrite`` through one buffer.
Tensors built in memory are written with ``pwrite``. Written ranges are handed to the kernel's
writeback as they complete (``sync_file_range`` from a thread of its own, as the request can block on a
busy disk), so writing to disk overlaps the copying and the final ``fsync`` has little left to do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import queue
import threading
from collections.abc import Callable

import torch

from neva_tools.errors import NevaError

_BUFFER = 8 << 20  # fallback copy buffer
_WRITEBACK_EVERY = 64 << 20  # start writeback of what was written after this many bytes
_NO_RANGE_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, errno.EPERM}
_SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range() -> Callable[[int, int, int], None] | None:
    """``sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)`` from libc (Linux), or None."""
    name = ctypes.util.find_library("c")
    func = getattr(ctypes.CDLL(name, use_errno=True), "sync_file_range", None) if name else None
    if func is None:
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]

    def start(fd: int, offset: int, nbytes: int) -> None:
        func(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)  # advisory: errors are ignored

    return start


class _Writeback:
    """Hands written ranges to the kernel's writeback from a thread of its own (the request may block)."""

    def __init__(self, fd: int, start: Callable[[int, int, int], None]) -> None:
        self._fd, self._start = fd, start
        self._queue: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="neva-writeback", daemon=True)
        self._thread.start()

    def request(self, offset: int, nbytes: int) -> None:
        """Queue ``nbytes`` from ``offset`` for writeback."""
        self._queue.put((offset, nbytes))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            self._start(self._fd, *item)

    def close(self) -> None:
        """Wait for the queued requests and end the thread."""
        self._queue.put(None)
        self._thread.join()


class RangeWriter:
    """Fill byte ranges of the file open as ``fd`` from other files or from tensors; counts bytes written."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.written = 0
        self.range_copy = hasattr(os, "copy_file_range")
        self._sources: dict[str, int] = {}
        self._buffer: bytearray | None = None
        self._scratch: torch.Tensor | None = None
        start = _sync_file_range()
        self._writeback = _Writeback(fd, start) if start is not None else None
        self._dirty: tuple[int, int] | None = None  # (start, end) written since the last writeback request

    def close(self) -> None:
        """Close the source files opened by ``copy``."""
        for fd in self._sources.values():
            os.close(fd)
        self._sources.clear()
        if self._writeback is not None:
            self._writeback.close()
            self._writeback = None

    def __enter__(self) -> RangeWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def copy(self, src: str, src_offset: int, nbytes: int, dst_offset: int) -> None:
        """Copy ``nbytes`` at ``src_offset`` of file ``src`` to ``dst_offset`` of the output."""
        if src not in self._sources:
            self._sources[src] = os.open(src, os.O_RDONLY)
        sfd, done = self._sources[src], 0
        while done < nbytes and self.range_copy:
            try:
                n = os.copy_file_range(sfd, self.fd, nbytes - done, src_offset + done, dst_offset + done)
            except OSError as exc:
                if exc.errno not in _NO_RANGE_COPY:
                    raise NevaError(f"copying {nbytes} bytes from {src} failed: {exc.strerror}") from None
                self.range_copy = False
                break
            if n == 0:
                raise NevaError(f"{src} ends before byte {src_offset + nbytes}; the file is truncated")
            done += n
        while done < nbytes:
            if self._buffer is None:
                self._buffer = bytearray(_BUFFER)
            view = memoryview(self._buffer)[: min(_BUFFER, nbytes - done)]
            n = os.preadv(sfd, [view], src_offset + done)
            if n == 0:
                raise NevaError(f"{src} ends before byte {src_offset + nbytes}; the file is truncated")
            self._pwrite(view[:n], dst_offset + done)
            done += n
        self._wrote(dst_offset, nbytes)

    def write(self, tensor: torch.Tensor, dst_offset: int) -> None:
        """Write a tensor's bytes (C-contiguous order) at ``dst_offset``.

        A non-contiguous tensor (a column slice) is first copied into a buffer kept for the next one:
        a fresh allocation would cost a page fault per 4 KiB on top of the copy.
        """
        tensor = tensor.detach()
        nbytes = tensor.numel() * tensor.element_size()
        if not tensor.is_contiguous():
            if self._scratch is None or self._scratch.numel() < nbytes:
                self._scratch = torch.empty(nbytes, dtype=torch.uint8, device="cpu")
            tensor = self._scratch[:nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor)
        self._pwrite(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()), dst_offset)
        self._wrote(dst_offset, nbytes)

    def zeros(self, nbytes: int, dst_offset: int) -> None:
        """Write ``nbytes`` zero bytes at ``dst_offset`` (vocabulary padding)."""
        done = 0
        while done < nbytes:
            n = min(_BUFFER, nbytes - done)
            self._pwrite(memoryview(bytes(n)), dst_offset + done)
            done += n
        self._wrote(dst_offset, nbytes)

    def _pwrite(self, data: memoryview, offset: int) -> None:
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], offset + done)

    def _wrote(self, offset: int, nbytes: int) -> None:
        """Count written bytes; ask the kernel to start writing back each contiguous run as it grows."""
        self.written += nbytes
        if self._writeback is None:
            return
        start, end = self._dirty if self._dirty is not None else (offset, offset)
        if offset != end:  # a new run: hand the previous one over
            self._writeback.request(start, end - start)
            start = offset
        end = offset + nbytes
        if end - start >= _WRITEBACK_EVERY:
            self._writeback.request(start, end - start)
            start = end
        self._dirty = (start, end)
