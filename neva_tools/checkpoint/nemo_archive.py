"""The NeMo-1 ``.nemo`` archive: an uncompressed tar with ``model_config.yaml``, weights and artifacts.

Member names (config, per-rank weights, artifacts) and the reader: ``NemoArchive`` reads tar files and
extracted directories alike and refuses members that would escape an extraction directory. The writer is
``neva_tools.checkpoint.nemo_writer.NemoWriter``.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tarfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO, Any

import torch
import yaml

from neva_tools.checkpoint.torch_lazy import LazyStateDict
from neva_tools.errors import NevaError

CONFIG_NAME = "model_config.yaml"
WEIGHTS_NAME = "model_weights.ckpt"
DIST_DIR = "model_weights"


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


class MemberReader(io.RawIOBase):
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


def artifact_refs(config: Any) -> set[str]:
    """Every member name a config references as ``nemo:<name>`` (at any depth; ``./`` prefixes removed)."""
    refs: set[str] = set()
    stack, seen = [config], set()
    while stack:  # iterative: a deeply nested YAML document cannot exhaust the recursion limit
        value = stack.pop()
        if isinstance(value, (dict, list, tuple)):
            if id(value) in seen:  # a YAML alias: visited once, however often it is referenced (no alias bomb)
                continue
            seen.add(id(value))
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
        elif isinstance(value, str) and value.startswith("nemo:"):
            refs.add("/".join(p for p in PurePosixPath(value[len("nemo:") :]).parts if p not in (".", "/")))
    return refs


_RANK_RE = re.compile(r"^(?:mp_rank_(\d{1,9})|tp_rank_(\d{1,9})_pp_rank_(\d{1,9}))/" + re.escape(WEIGHTS_NAME) + "$")


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
        self._name_set = frozenset(self.names)  # membership checks are per member: never search the list
        self._ranks: tuple[int, int] | None = None
        self._layout: str | None = None
        if CONFIG_NAME not in self._name_set:
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
        if name not in self._name_set:
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
            except yaml.YAMLError as exc:  # bad syntax, and bytes that are not UTF-8 (ReaderError)
                raise NevaError(f"{self.path}: {CONFIG_NAME} is not valid YAML: {exc}") from None
            except RecursionError:
                raise NevaError(f"{self.path}: {CONFIG_NAME} is nested too deeply to be a model config") from None
        if not isinstance(cfg, dict):
            raise NevaError(f"{self.path}: {CONFIG_NAME} is not a mapping")
        return cfg

    @property
    def layout(self) -> str:
        """``dist`` for a megatron-core distributed checkpoint, ``legacy`` for ``model_weights.ckpt`` files."""
        if self._layout is None:
            if any(n.startswith(DIST_DIR + "/") for n in self.names):
                self._layout = "dist"
            elif WEIGHTS_NAME in self._name_set or any(_RANK_RE.match(n) for n in self.names):
                self._layout = "legacy"
            else:
                raise NevaError(f"{self.path} holds no weights ({WEIGHTS_NAME}, mp_rank_XX/ or {DIST_DIR}/)")
        return self._layout

    def legacy_ranks(self) -> tuple[int, int]:
        """(tp, pp) of a legacy archive, from its rank directories; gaps are an error naming the missing one."""
        if self._ranks is None:
            self._ranks = self._find_ranks()
        return self._ranks

    def _find_ranks(self) -> tuple[int, int]:
        if WEIGHTS_NAME in self._name_set:
            return 1, 1
        found = set()
        for name in self.names:
            m = _RANK_RE.match(name)
            if m:
                found.add((int(m.group(1)), 0) if m.group(1) is not None else (int(m.group(2)), int(m.group(3))))
        if not found:
            raise NevaError(f"{self.path} holds no weights ({WEIGHTS_NAME}, mp_rank_XX/ or {DIST_DIR}/)")
        tp = max(t for t, _ in found) + 1
        pp = max(p for _, p in found) + 1
        for t in range(tp):  # stops at the first gap, which comes within the first len(found) + 1 ranks
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
            fh = io.BufferedReader(MemberReader(self.path, info.offset_data, info.size), 1 << 16)
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

    def split_artifacts(self, config: Any = None) -> tuple[list[str], list[str]]:
        """``other_members`` split into those ``config`` (default: this archive's) references with ``nemo:<name>``
        (a file, or every member under a directory ``<name>/``) and the rest, which nothing reads; linear in
        the number of members."""
        refs = artifact_refs(self.read_config() if config is None else config)
        depth = max((ref.count("/") + 1 for ref in refs), default=0)
        referenced, unreferenced = [], []
        for name in self.other_members():
            hit, cut = name in refs, -1
            for _ in range(depth):  # the member's parent directories, as deep as a reference goes
                cut = name.find("/", cut + 1)
                if hit or cut < 0:
                    break
                hit = name[:cut] in refs
            (referenced if hit else unreferenced).append(name)
        return referenced, unreferenced

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

    def extract_dist(self, dest: str | os.PathLike) -> Path:
        """Extract the ``model_weights/`` dist checkpoint into ``dest`` and check it is safe to read; return it."""
        from neva_tools.checkpoint.safe_dist import check_directory

        directory = self.extract(DIST_DIR, dest)
        check_directory(directory, f"{self.path}:{DIST_DIR}")
        return directory

    def artifact(self, ref: str, dest: str | os.PathLike) -> Path:
        """Extract a ``nemo:<name>`` artifact reference (a file or a directory) into ``dest``."""
        if not ref.startswith("nemo:"):
            raise NevaError(f"{ref!r} is not a nemo: artifact reference")
        return self.extract(ref[len("nemo:") :], dest)
