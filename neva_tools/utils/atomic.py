"""Atomic outputs: write to a temporary path next to the target, rename when complete.

A failure (exception, Ctrl-C, kill) never leaves a half-written output at the target path. The temporary path
is hidden and names its writer: ``.<name>.tmp-<pid>-<host>-<random>`` (``<host>``: 8 hex digits of the machine's
name and PID namespace). It is removed on every exit Python sees; one that a killed process (SIGKILL, OOM, power
loss) left is removed, with a note, by the next writer of the same output once its pid is gone on this machine
(``remove_stale_temporaries``). Scratch directories (``scratch_directory``) are removed when the process exits.
A full disk while writing is a ``NevaError`` naming the output (``disk_full_error``), the temporary removed.

Every output has a kind (``OutputKind``): a file or a directory, and a recogniser of an earlier output of
that kind. An existing path is replaced (``--overwrite``) only when it is such an earlier output, or an
empty file or directory: never an unrelated file, a directory of something else, a directory where a file
goes or a file where a directory goes. Recognisers read names and headers; only small files (a sentencepiece
model, a JSON object under 8 MiB) are parsed whole.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from neva_tools.utils.output_kinds import (  # noqa: F401  (re-exported: the writers import them from here)
    ANSWERS,
    ANY_FILE,
    CHECKPOINT_EXPORTS_DIR,
    EVAL_PREDICTIONS,
    EVAL_REPORT,
    HF_MODEL_DIR,
    HF_TOKENIZER_DIR,
    MMAP_BIN,
    MMAP_IDX,
    NEMO_FILE,
    PACK_PLAN,
    SENTENCEPIECE_MODEL,
    OutputKind,
    Recogniser,
    check_output_kind,
    check_output_path,
    describe,
    json_object,
    jsonl_rows,
    kind_problem,
)
from neva_tools.utils.temporaries import (  # noqa: F401  (re-exported)
    DISK_FULL_ERRNOS,
    KILL_AT_VAR,
    PARTIAL_REMOVED,
    SCRATCH_PREFIX,
    TEMP_ROLES,
    disk_full,
    disk_full_error,
    host_tag,
    kill_point,
    make_temp,
    remove_path,
    remove_stale_temporaries,
    scratch,
    scratch_directory,
    temp_path,
)

logger = logging.getLogger(__name__)

# --- writing ---------------------------------------------------------------------------------------------------


def _replace(tmp: Path, target: Path) -> None:
    if target.is_dir() and not target.is_symlink():
        old = make_temp(target, is_dir=True, role="old")
        os.replace(target, old / target.name)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, kind: OutputKind = ANY_FILE, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path (a file path, or a created directory for a directory ``kind``) that becomes ``target``.

    ``target`` is checked (``check_output_path``) on entry and again just before the rename. Temporaries that killed
    writers of ``target`` left are removed first; a full disk is a ``NevaError`` naming ``target``.
    """
    target = Path(target)
    check_output_path(target, overwrite, kind)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    try:
        tmp = make_temp(target, is_dir=kind.is_dir)
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            raise disk_full_error(target, exc, removed="nothing was written") from None
        raise
    try:
        kill_point("atomic")
        yield tmp
        check_output_path(target, overwrite, kind)  # something may have appeared there meanwhile
        _replace(tmp, target)
    except BaseException as exc:
        remove_path(tmp)
        full = disk_full(exc)
        if full is not None:
            raise disk_full_error(target, full) from None
        raise
