"""The error boundary of ``neva`` (``neva_tools.cli.boundary``): an ``OSError`` on the output side or an input that
cannot be decoded is one line ``neva: error: ...`` naming the file and what to do (exit status 2), a bug keeps its
traceback (exit status 1), a multi-process job prints the line once, and Ctrl-C is ``neva: interrupted`` (exit
status 130) wherever it lands: during the imports, reading, writing, in a worker thread, in a process a library
forked, and after the command ended. The interrupts are sent by a hook at chosen points
(``$NEVA_TEST_INTERRUPT_AT``), not after a delay."""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from neva_tools.cli import boundary
from neva_tools.cli.main import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _plain_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS",
                boundary.INTERRUPT_AT_VAR):  # fmt: skip
        monkeypatch.delenv(var, raising=False)


def _one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("neva: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def nemo(tmp_path_factory: pytest.TempPathFactory, llama_hf: Path) -> Path:
    """A TP-2 legacy ``.nemo`` of the tiny LLaMA."""
    out = tmp_path_factory.mktemp("boundary") / "llama.nemo"
    assert main(["-q", "convert", "hf-to-nemo", "--input", str(llama_hf), "--output", str(out), "--tp", "2"]) == 0
    return out


# -- the output side --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("command", ["convert", "repartition"])
def test_output_in_proc(command: str, llama_hf: Path, nemo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = (["convert", "hf-to-nemo", "--input", str(llama_hf)] if command == "convert" else
            ["repartition", "--input", str(nemo), "--tp", "1"])  # fmt: skip
    assert main(["--no-progress", *argv, "--output", "/proc/x.nemo"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line == ("neva: error: cannot write /proc/x.nemo: No such file or directory — /proc does not take new "
                    "files: choose an output in a regular folder you can write to (--output)"), line  # fmt: skip


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux /sys")
def test_output_in_an_unwritable_folder(llama_hf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--no-progress", "convert", "hf-to-nemo", "--input", str(llama_hf), "--output", "/sys/x.nemo"])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and line.startswith("neva: error: cannot write /sys/x.nemo: "), line
    assert ("Permission denied — choose an output in a folder you can write to (--output)" in line
            or "Read-only file system — that file system is read-only" in line), line  # fmt: skip


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A 300 KiB tmpfs where this machine lets the tests mount one (root in a container), else skip."""
    where = tmp_path / "small"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); the fault-injecting tests cover it")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["convert", "nemo-to-hf", "--input", "{nemo}"], "No space left on device"),  # safetensors: "os error 28"
        (["convert", "hf-to-nemo", "--input", "{hf}", "--format", "dist"], "No space left on device"),
        (["repartition", "--input", "{nemo}", "--tp", "1"], "No space left on device"),
    ],
    ids=["nemo-to-hf", "hf-to-nemo-dist", "repartition"],
)  # fmt: skip
def test_full_disk(argv: list[str], reason: str, small_disk: Path, llama_hf: Path, nemo: Path,
                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = small_disk / "out"
    argv = [a.format(nemo=nemo, hf=llama_hf) for a in argv]
    code = main(["-q", "--no-progress", *argv, "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    line = err.splitlines()[-1]
    assert "Traceback" not in err and line.startswith("neva: error: ") and str(out) in line, err
    assert reason.lower() in line.lower() or "as on a full disk" in line, line
    assert "free space" in line, line
    assert os.listdir(small_disk) == [], os.listdir(small_disk)  # nothing left behind


def _count_tokens_raising(monkeypatch: pytest.MonkeyPatch, func: Any) -> None:
    monkeypatch.setattr("neva_tools.data.mmap.count_tokens", func)


def test_disk_full_without_a_file_name_names_the_open_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """``write()`` on a full disk raises ``OSError(ENOSPC)`` without a file name: the open file of the failing frame
    is named (a fault-injecting writer stands for the full disk)."""
    target = tmp_path / "tokens.bin"

    def writes(prefix: Any) -> None:
        with open(target, "wb") as fh:
            fh.write(b"x")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    _count_tokens_raising(monkeypatch, writes)
    assert main(["data", "count-tokens", "whatever"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line == (f"neva: error: cannot write {target}: No space left on device — free space there (df -h "
                    f"{tmp_path}) or write the output elsewhere")  # fmt: skip


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (errno.ENOSPC, "No space left on device — free space there (df -h {folder}) or write the output elsewhere "
                       "(--output)"),
        (errno.EROFS, "Read-only file system — that file system is read-only: choose an output in a writable folder "
                      "(--output)"),
        (errno.EACCES, "Permission denied — choose an output in a folder you can write to (--output), or change its "
                       "permissions"),
    ],
)  # fmt: skip
def test_os_errors_of_an_output_name_it_and_what_to_do(code: int, expected: str, tmp_path: Path) -> None:
    out = tmp_path / "model.nemo"
    temporary = tmp_path / ".model.nemo.tmp-123-0badf00d-1234abcd"  # utils.atomic's hidden temporary: the output
    message = boundary.os_error_message(OSError(code, os.strerror(code), str(temporary)),
                                        argparse.Namespace(output=str(out)))  # fmt: skip
    assert message == f"cannot write {out}: {expected.format(folder=tmp_path)}"


def test_missing_output_folder_and_unreadable_input(tmp_path: Path) -> None:
    args = argparse.Namespace(output=str(tmp_path / "no" / "dir" / "x.nemo"))
    missing = OSError(errno.ENOENT, "No such file or directory", str(tmp_path / "no" / "dir" / "x.nemo"))
    assert boundary.os_error_message(missing, args) == (
        f"cannot write {tmp_path}/no/dir/x.nemo: No such file or directory — its folder {tmp_path}/no/dir does not "
        "exist: create it or choose another path")  # fmt: skip
    source = tmp_path / "in.nemo"
    source.write_bytes(b"x")
    denied = OSError(errno.EACCES, "Permission denied", str(source))
    assert boundary.os_error_message(denied, args) == (
        f"cannot read {source}: Permission denied — make it readable by this user (chmod/chown) or copy it somewhere "
        "readable")  # fmt: skip
    assert boundary.os_error_message(OSError(errno.ECONNREFUSED, "Connection refused"), args) is None  # not ours


# -- the input side ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["json", "utf8", "yaml", "recursion"])
def test_undecodable_input_is_named(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """A reader that lets a decoding error through: the boundary names the file it was reading and the problem."""
    path = tmp_path / f"input.{kind}"
    content = {"json": b'{"a": [1, 2,, 3]}', "utf8": b'{"text": "caf\xe9"}', "yaml": b"a: [1\nb: 2\n",
               "recursion": b"[" * 100_000 + b"]" * 100_000}[kind]  # fmt: skip
    path.write_bytes(content)

    def reads(prefix: Any) -> Any:
        if kind == "yaml":
            with open(path, encoding="utf-8") as fh:
                return yaml.safe_load(fh)
        if kind == "utf8":
            with open(path, encoding="utf-8") as fh:
                return fh.read()
        return json.loads(path.read_text())

    _count_tokens_raising(monkeypatch, reads)
    assert main(["data", "count-tokens", "whatever"]) == 2
    line = _one_line(capsys.readouterr().err)
    expected = {
        "json": f"cannot read {path}: it is not valid JSON (line 1, column 13: Expecting value) — fix the file",
        "utf8": f"cannot read {path}: it is not UTF-8 text (byte 0xe9) — save it as UTF-8",
        "yaml": f"cannot read {path}: it is not valid YAML (line 2, column 2: expected ',' or ']', but got ':') — fix",
        "recursion": f"cannot read {path}: nesting too deep in an input file — flatten its nested lists/mappings",
    }[kind]
    assert line.startswith(f"neva: error: {expected}"), line


def test_recursion_in_our_own_code_is_a_bug(monkeypatch: pytest.MonkeyPatch) -> None:
    def loops(prefix: Any) -> Any:
        return loops(prefix)

    _count_tokens_raising(monkeypatch, loops)
    with pytest.raises(RecursionError):
        main(["data", "count-tokens", "whatever"])


def test_a_bug_keeps_its_traceback(tmp_path: Path) -> None:
    """A RuntimeError inside a command: exit status 1 and Python's traceback, no ``neva: error`` line."""
    code = ("import sys\nimport neva_tools.data.mmap as mmap\n"
            "def boom(prefix):\n    raise RuntimeError('internal bug: boom')\n"
            "mmap.count_tokens = boom\nfrom neva_tools.cli.main import main\n"
            "sys.exit(main(['data', 'count-tokens', 'x']))\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "Traceback (most recent call last)" in done.stderr and "RuntimeError: internal bug: boom" in done.stderr
    assert "neva: error" not in done.stderr


def test_broken_pipe_is_quiet() -> None:
    def writes() -> None:
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    stdout = os.dup(1)
    try:
        assert boundary.run(writes) == 141
    finally:
        os.dup2(stdout, 1)
        os.close(stdout)


def test_multi_process_job_reports_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    monkeypatch.setenv("NEVA_REPORT_DIR", str(tmp_path))
    monkeypatch.setenv("WORLD_SIZE", "2")
    printed = []
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        assert main(["--no-progress", "convert", "hf-to-nemo", "--input", str(tmp_path), "--output",
                     "/proc/x.nemo"]) == 2  # fmt: skip
        printed.append(capsys.readouterr().err)
    assert printed[0].startswith("neva: error: ") and printed[1] == "", printed


# -- Ctrl-C -----------------------------------------------------------------------------------------------------------

_FORKED_WRITER = "call:megatron.core.dist_checkpointing.strategies.filesystem_async:write_preloaded_data@group"
#: (command, hook point): eight points, each a place where an interrupt used to end with a traceback or could
INTERRUPTS = [
    ("hf-to-nemo", "import:torch.nn@group"),  # while torch is imported (seconds, before the command starts)
    ("hf-to-nemo", "call:neva_tools.checkpoint.hf_reader:get:3@group"),  # reading the third tensor
    ("hf-to-nemo-dist", _FORKED_WRITER),  # in the writer process megatron-core forks
    ("hf-to-nemo-dist", "call:neva_tools.checkpoint.dist:save_full"),  # before torch's distributed checkpoint save
    ("hf-to-nemo-dist", "import:torch.nn@worker@group"),  # while the Manager process megatron-core spawns starts
    ("repartition", "call:neva_tools.checkpoint.fill:copy:3@group"),  # copying byte ranges into the output
    ("repartition", "call:neva_tools.checkpoint.fill:_run@group"),  # in the writeback thread
    ("repartition", "exit@group"),  # after the command ended, in an atexit handler
]


def _command(kind: str, llama_hf: Path, nemo: Path, out: Path) -> list[str]:
    if kind == "repartition":
        return ["repartition", "--input", str(nemo), "--output", str(out), "--tp", "1"]
    fmt = ["--format", "dist"] if kind.endswith("dist") else []
    return ["convert", "hf-to-nemo", "--input", str(llama_hf), "--output", str(out), "--tp", "2", *fmt]


def _group_gone(pgid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


#: ``python -m neva_tools``: the processes multiprocessing spawns do not import a package's ``__main__``
MODULE_INTERRUPTS = [("hf-to-nemo-dist", "import:torch.nn@worker@group"), ("hf-to-nemo", "import:torch.nn@group")]
CASES = [(k, p, "script") for k, p in INTERRUPTS] + [(k, p, "module") for k, p in MODULE_INTERRUPTS]


@pytest.mark.parametrize(("kind", "point", "launcher"), CASES,
                         ids=[f"{k}-{p.split(':')[-1]}-{how}" for k, p, how in CASES])  # fmt: skip
def test_ctrl_c_is_one_line_and_130(kind: str, point: str, launcher: str, llama_hf: Path, nemo: Path,
                                    tmp_path: Path) -> None:  # fmt: skip
    """The console command (a script like ``.venv/bin/neva``, or ``python -m neva_tools``) in a process group of its
    own; SIGINT at ``point``."""
    script = tmp_path / "neva"
    script.write_text("import sys\nfrom neva_tools.cli.main import main\nif __name__ == '__main__':\n"
                      "    sys.exit(main())\n")  # fmt: skip
    entry = [str(script)] if launcher == "script" else ["-m", "neva_tools"]
    out = tmp_path / "out" / "model.nemo"
    out.parent.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), boundary.INTERRUPT_AT_VAR: point}
    proc = subprocess.Popen([sys.executable, *entry, "-q", "--no-progress", *_command(kind, llama_hf, nemo, out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True,  # Ctrl-C's process group, without pytest in it
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        _, err = proc.communicate(timeout=240)
    finally:
        gone = _group_gone(proc.pid, 20)  # no worker process left running (megatron's Manager, writers)
        if not gone:
            os.killpg(proc.pid, signal.SIGKILL)
    assert (proc.returncode, err) == (130, "neva: interrupted\n"), err
    assert gone, "processes of the interrupted command were left running"
    litter = [p.name for p in out.parent.iterdir() if p.name.startswith(".")]
    assert litter == [], litter
    assert out.exists() == point.startswith("exit")  # written only when the command had ended
