"""No litter: a writer's temporaries next to its output carry its pid and go on every exit we control; the ones a
killed writer left (SIGKILL at a point chosen by ``NEVA_TEST_KILL_AT``, not by timing) are removed, with a note, by
the next run writing that output; scratch directories in $TMPDIR go at exit (a killed process's: at the next start);
a full disk (a fault-injecting writer) is our error naming the output, the temporary removed."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from neva_tools.errors import NevaError
from neva_tools.utils.atomic import HF_MODEL_DIR, KILL_AT_VAR, SCRATCH_PREFIX, atomic_path, host_tag, temp_path


def _neva(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != KILL_AT_VAR}
    return subprocess.run([sys.executable, "-m", "neva_tools", *args], capture_output=True, text=True,
                          env={**environ, **(env or {})}, timeout=600)  # fmt: skip


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --- names and the sweep ---------------------------------------------------------------------------------------


def test_temporary_names_carry_the_pid(tmp_path: Path) -> None:
    tag = rf"{os.getpid()}-{host_tag()}-[0-9a-f]{{8}}"
    with atomic_path(tmp_path / "out.bin") as tmp:
        assert re.fullmatch(rf"\.out\.bin\.tmp-{tag}", tmp.name), tmp.name
        tmp.write_bytes(b"x")
    with atomic_path(tmp_path / "model", kind=HF_MODEL_DIR) as tmp:
        assert re.fullmatch(rf"\.model\.tmp-{tag}", tmp.name) and tmp.is_dir(), tmp.name
    assert re.fullmatch(rf"\.c_text_document\.bin\.tmp-{tag}", temp_path(tmp_path / "c_text_document.bin").name)
    assert sorted(os.listdir(tmp_path)) == ["model", "out.bin"]


def test_stale_temporaries_of_dead_writers_are_removed_with_a_note(tmp_path: Path) -> None:
    dead, host = _dead_pid(), host_tag()
    other_host = "0" * 8 if host != "0" * 8 else "1" * 8
    stale = [f".x.bin.tmp-{dead}-{host}-0000aaaa", f".x.bin.old-{dead}-{host}-0000bbbb",
             f".x.bin.stage-{dead}-{host}-0000cccc"]  # fmt: skip
    kept = [f".x.bin.tmp-{os.getppid()}-{host}-0000dddd",  # a live writer
            f".x.bin.tmp-{dead}-{other_host}-0000eeee",  # another machine's (or container's) pid
            f".y.bin.tmp-{dead}-{host}-0000ffff",  # another output's
            ".x.bin.tmp-k3j_x9q2"]  # fmt: skip # no pid in the name: nothing tells whether its writer runs
    for name in stale + kept:
        if ".old-" in name or ".stage-" in name:
            (tmp_path / name).mkdir()
            (tmp_path / name / "part").write_bytes(b"p")
        else:
            (tmp_path / name).write_bytes(b"partial")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()  # on the module's logger: another test's CLI run may filter the root's handlers
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("neva_tools.utils.temporaries")
    logger.addHandler(handler)
    level, _ = logger.level, logger.setLevel(logging.INFO)
    try:
        with atomic_path(tmp_path / "x.bin") as tmp:
            tmp.write_bytes(b"new")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert _hidden(tmp_path) == sorted(kept)
    assert (tmp_path / "x.bin").read_bytes() == b"new"
    notes = [r.getMessage() for r in records if "no longer running" in r.getMessage()]
    assert len(notes) == 3 and all(f"left by process {dead}," in n for n in notes)
    for name in stale:
        assert any(n.startswith(f"removed {tmp_path / name}: a temporary of x.bin") for n in notes)


# --- kills -----------------------------------------------------------------------------------------------------


def _killed_then_rerun(args: list[str], point: str, folder: Path, pieces: list[str]) -> subprocess.CompletedProcess:
    """Run ``neva args`` killed at ``point``; check what it left (``pieces``: roles of hidden entries, with the
    process's pid); run it again; return the second run."""
    # Its own process group, output to a file: helpers it started (megatron-core's dist writer starts a
    # multiprocessing manager) outlive a SIGKILL and would hold a pipe open; they are ended with the group.
    with open(folder.parent / "killed.log", "wb") as log:
        killed = subprocess.Popen([sys.executable, "-m", "neva_tools", *args], stdout=log, stderr=log,
                                  env={**os.environ, KILL_AT_VAR: point}, start_new_session=True)  # fmt: skip
        try:
            killed.wait(timeout=600)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(killed.pid, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL, (folder.parent / "killed.log").read_text()
    left = _hidden(folder)
    assert sorted(re.sub(rf"-{killed.pid}-{host_tag()}-[0-9a-f]{{8}}$", "", n) for n in left) == sorted(pieces), left
    again = _neva(*args)
    assert again.returncode == 0, again.stderr
    assert _hidden(folder) == []
    for name in left:
        assert f"removed {folder / name}" in again.stderr and f"process {killed.pid}" in again.stderr
    return again


def test_killed_dist_convert_is_cleaned_up_by_the_next_run(tmp_path: Path, llama_hf: Path) -> None:
    out = tmp_path / "out" / "llm.nemo"
    args = ["convert", "hf-to-nemo", "--input", str(llama_hf), "--output", str(out), "--format", "dist"]
    _killed_then_rerun(args, "dist-staging", out.parent, [".llm.nemo.tmp", ".llm.nemo.stage"])
    assert sorted(os.listdir(out.parent)) == ["llm.nemo"]


def test_killed_repartition_is_cleaned_up_by_the_next_run(tmp_path: Path, llama_hf: Path) -> None:
    from neva_tools.convert.hf_to_nemo import convert_hf_to_nemo

    source = convert_hf_to_nemo(str(llama_hf), tmp_path / "in.nemo").output
    out = tmp_path / "out" / "tp2.nemo"
    args = ["repartition", "--input", str(source), "--output", str(out), "--tp", "2"]
    _killed_then_rerun(args, "atomic", out.parent, [".tp2.nemo.tmp"])
    assert sorted(os.listdir(out.parent)) == ["tp2.nemo"]


def test_killed_preprocess_is_cleaned_up_by_the_next_run(tmp_path: Path, sp_model: Path, corpus: list[str]) -> None:
    text = tmp_path / "in.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus))
    out = tmp_path / "out"
    args = ["data", "preprocess", "--input", str(text), "--output-prefix", str(out / "c"), "--tokenizer", str(sp_model)]
    _killed_then_rerun(args, "preprocess", out, [".c_text_document.bin.tmp"])
    assert sorted(os.listdir(out)) == ["c_text_document.bin", "c_text_document.idx"]


# --- full disk -------------------------------------------------------------------------------------------------


def test_a_full_disk_is_found_behind_wrappers() -> None:
    from torch.distributed.checkpoint.api import CheckpointException

    from neva_tools.utils.atomic import disk_full

    assert disk_full(OSError(errno.ENOSPC, "No space left on device", "/x/y")).filename == "/x/y"
    worker = RuntimeError("Worker failure: [Errno 28] No space left on device")  # megatron-core's writer processes
    assert disk_full(CheckpointException("write", {1: (worker, [])})).errno == errno.ENOSPC
    rust = ValueError('Error while serializing: IoError(Os { code: 122, kind: QuotaExceeded, message: "Disk quota" })')
    assert disk_full(rust).errno == errno.EDQUOT
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise RuntimeError("writing failed") from exc
    except RuntimeError as exc:
        assert disk_full(exc).errno == errno.ENOSPC
    for other in (OSError(errno.EACCES, "Permission denied"), RuntimeError("[Errno 13] Permission denied: 'x'"),
                  CheckpointException("write", {}), KeyboardInterrupt()):  # fmt: skip
        assert disk_full(other) is None


class _FullDisk(io.FileIO):
    """A file on a disk with ``room`` bytes free: a write beyond fails with ENOSPC (as ``write(2)`` does)."""

    room = 600

    def write(self, data: Any) -> int:
        if self.tell() + len(memoryview(data)) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def _full_disk_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
    """``open`` whose binary writers buffer in front of ``_FullDisk``: closing flushes and fails again."""
    if "w" in mode and "b" in mode:
        return io.BufferedWriter(_FullDisk(file, "w"), buffer_size=64)
    return open(file, mode, *args, **kwargs)


def test_full_disk_in_a_nemo_writer_is_our_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from neva_tools.checkpoint import nemo_writer

    monkeypatch.setattr(nemo_writer, "open", _full_disk_open, raising=False)
    out = tmp_path / "model.nemo"
    with pytest.raises(NevaError, match=rf"no space left on device while writing {re.escape(str(out))}: the partial "
                       "output was removed; free space"), nemo_writer.NemoWriter(out) as writer:  # fmt: skip
        writer.add_bytes("model_config.yaml", b"x" * 1000)
    assert os.listdir(tmp_path) == []


def test_full_disk_at_the_end_of_a_nemo_writer_is_our_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The members fit; the tar's closing blocks do not."""
    from neva_tools.checkpoint import nemo_writer

    monkeypatch.setattr(nemo_writer, "open", _full_disk_open, raising=False)
    monkeypatch.setattr(_FullDisk, "room", 1500)
    out = tmp_path / "model.nemo"
    with pytest.raises(NevaError, match="no space left on device while writing"), nemo_writer.NemoWriter(out) as w:
        w.add_bytes("model_config.yaml", b"x" * 10)
    assert os.listdir(tmp_path) == []


def test_full_disk_in_preprocess_is_our_error(tmp_path: Path, sp_model: Path, corpus: list[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from megatron.core.datasets import indexed_dataset

    from neva_tools.data.mmap import preprocess_jsonl

    text = tmp_path / "in.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus))
    monkeypatch.setattr(indexed_dataset, "open", _full_disk_open, raising=False)
    bin_path = tmp_path / "out" / "c_text_document.bin"
    with pytest.raises(NevaError, match=rf"no space left on device while writing {re.escape(str(bin_path))}: the "
                       r"partial \.bin and \.idx were removed"):  # fmt: skip
        preprocess_jsonl(text, tmp_path / "out" / "c", sp_model)
    assert os.listdir(tmp_path / "out") == []


def test_full_disk_while_staging_a_dist_checkpoint_is_our_error(tmp_path: Path, llama_hf: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """megatron-core's writer processes report ENOSPC as text inside torch's CheckpointException."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from neva_tools.convert.hf_to_nemo import convert_hf_to_nemo

    def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(filesystem_async, "_write_item", full)
    out = tmp_path / "llm.nemo"
    with pytest.raises(NevaError, match=rf"no space left on device while writing {re.escape(str(out))}: the partial"):
        convert_hf_to_nemo(str(llama_hf), out, fmt="dist")
    assert os.listdir(tmp_path) == []


# --- scratch directories ---------------------------------------------------------------------------------------

_SCRATCH = """
import logging, os, signal, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
from neva_tools.model.neva_io import scratch_dir
path = scratch_dir()
(path / "tokenizer.model").write_bytes(b"t")
print(os.getpid(), path, flush=True)
if sys.argv[1] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _scratch(tmpdir: Path, how: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _SCRATCH, how], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TMPDIR": str(tmpdir)})  # fmt: skip


def test_scratch_directories_go_at_exit_and_after_a_kill(tmp_path: Path) -> None:
    done = _scratch(tmp_path, "exit")
    pid, path = done.stdout.split()
    assert done.returncode == 0 and Path(path).parent == tmp_path
    assert Path(path).name.startswith(f"{SCRATCH_PREFIX}{pid}-{host_tag()}-")
    assert os.listdir(tmp_path) == []
    killed = _scratch(tmp_path, "kill")
    assert killed.returncode == -signal.SIGKILL
    pid, path = killed.stdout.split()
    assert os.listdir(tmp_path) == [Path(path).name] and f"-{pid}-" in path
    after = _scratch(tmp_path, "exit")
    assert after.returncode == 0 and f"removed {path}: a scratch directory left by process {pid}," in after.stderr
    assert os.listdir(tmp_path) == []


def test_config_validate_leaves_nothing_in_tmpdir(tmp_path: Path, llama_hf: Path, shapes: dict) -> None:
    from neva_tools.convert.hf_to_nemo import convert_hf_to_nemo
    from neva_tools.demo import build_clip

    llm = convert_hf_to_nemo(str(llama_hf), tmp_path / "llm.nemo").output
    clip = build_clip(tmp_path / "clip")
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    done = _neva("config", "validate", f"model.mm_cfg.llm.from_pretrained={llm}",
                 f"model.mm_cfg.vision_encoder.from_pretrained={clip}", f"model.data.data_path={shapes['pretrain']}",
                 f"model.data.image_folder={shapes['images']}", "model.data.max_seq_length=128",
                 "model.mm_cfg.llm.model_type=plain", env={"TMPDIR": str(tmpdir)})  # fmt: skip
    assert done.returncode == 0 and "OK: the config is valid" in done.stdout, done.stdout + done.stderr
    assert os.listdir(tmpdir) == []
