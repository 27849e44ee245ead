"""The logging policy of every command (``neva_tools.utils.log``): levels per flag and rank, one line format, known
library noise dropped, other warnings shown once with their origin, a user error told by one rank, global flags
before or after the subcommand, and the launcher's short ending."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from neva_tools.cli.main import build_parser, main
from neva_tools.utils import launch
from neva_tools.utils.log import (
    QUIET_WARNINGS,
    LogPolicy,
    first_to_report,
    is_quiet_warning,
    module_name,
    setup_logging,
)

ROOT = Path(__file__).resolve().parents[2]
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "NEVA_REPORT_DIR",
                "TRANSFORMERS_VERBOSITY", "TORCH_LOGS")  # fmt: skip

# Each kind of message a command meets, logged after setup_logging(verbosity) in a fresh process.
EMITTER = """
import logging, sys, sysconfig, warnings
from neva_tools.utils.log import setup_logging
site = sysconfig.get_paths()["purelib"]
setup_logging(int(sys.argv[1]))
ours = logging.getLogger("neva_tools.train.run")
ours.debug("ours debug")
ours.info("ours info")
ours.warning("ours warning")
ours.error("ours error")
lib = logging.getLogger("megatron.core.foo")
lib.info("library info")
lib.warning("library warning")
logging.info("root info")  # open_clip logs on the root logger
logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found, using CUDA_HOME='/usr/local'")
logging.getLogger("megatron.core.models.multimodal.llava_model").warning("LLaVA is work in progress. Features ...")
for _ in range(3):  # a known fallback notice, raised from megatron
    warnings.warn_explicit("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
                           UserWarning, site + "/megatron/core/optimizer/__init__.py", 24,
                           module="megatron.core.optimizer")
for line in (10, 11):  # another library warning, from two places: shown once
    warnings.warn_explicit("something the user may act on", UserWarning, site + "/somelib/thing.py", line,
                           module="somelib.thing")
print("result")
"""


def emit(verbosity: int, **env: str) -> tuple[list[str], str]:
    """(stderr lines, stdout) of ``EMITTER`` at ``verbosity`` with launcher variables ``env``."""
    clean = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    clean.update(PYTHONPATH=str(ROOT), **env)
    done = subprocess.run([sys.executable, "-c", EMITTER, str(verbosity)], env=clean, capture_output=True, text=True,
                          timeout=60, check=True)  # fmt: skip
    return done.stderr.splitlines(), done.stdout


def test_default_shows_our_info_and_library_warnings_with_their_origin() -> None:
    err, out = emit(0)
    assert out == "result\n"
    assert err == [
        "INFO: ours info",
        "WARNING: ours warning",
        "ERROR: ours error",
        "WARNING [megatron.core.foo]: library warning",
        "WARNING [somelib.thing:10]: UserWarning: something the user may act on",
    ]


def test_quiet_leaves_errors_only() -> None:
    err, out = emit(-1)
    assert out == "result\n" and err == ["ERROR: ours error"]


def test_verbose_shows_library_info_and_our_debug() -> None:
    err, _ = emit(1)
    assert "DEBUG [neva_tools.train.run]: ours debug" in err
    assert "INFO [megatron.core.foo]: library info" in err and "INFO [<string>]: root info" in err
    assert not any("No CUDA runtime" in line or "Apex" in line or "LLaVA is work" in line for line in err)


def test_other_ranks_log_warnings_and_errors_only_naming_their_rank() -> None:
    err, _ = emit(0, RANK="1", WORLD_SIZE="2")
    assert err == [
        "WARNING [rank 1]: ours warning",
        "ERROR [rank 1]: ours error",
        "WARNING [rank 1, megatron.core.foo]: library warning",
        "WARNING [rank 1, somelib.thing:10]: UserWarning: something the user may act on",
    ]


def test_policy_table() -> None:
    assert LogPolicy.for_flags(0) == LogPolicy(logging.INFO, logging.WARNING)
    assert LogPolicy.for_flags(0, rank=3) == LogPolicy(logging.WARNING, logging.WARNING)
    assert LogPolicy.for_flags(-1, rank=0) == LogPolicy(logging.ERROR, logging.ERROR)
    assert LogPolicy.for_flags(1, rank=3) == LogPolicy(logging.DEBUG, logging.INFO)
    assert LogPolicy.for_flags(2) == LogPolicy(logging.DEBUG, logging.DEBUG)


def test_noise_rules_are_precise() -> None:
    te = "Transformer Engine and Apex are not installed. Falling back to Torch optimizers."
    assert is_quiet_warning(te, UserWarning, "megatron.core.optimizer")
    assert not is_quiet_warning(te, UserWarning, "neva_tools.train.run")  # the same words elsewhere are shown
    assert not is_quiet_warning("Apex is not installed", DeprecationWarning, "megatron.core")  # another category
    assert not is_quiet_warning("some other megatron warning", UserWarning, "megatron.core.optimizer")
    assert all(rule.why for rule in QUIET_WARNINGS)
    site = Path(logging.__file__).parent  # the standard library is on sys.path
    assert module_name(str(site / "handlers.py")) == "logging.handlers"
    assert module_name(str(site / "__init__.py")) == "logging"


def test_a_user_error_is_claimed_by_one_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NEVA_REPORT_DIR", str(tmp_path))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert first_to_report(wait_s=0) is True  # the first rank that saw it tells it (here rank 1)
    monkeypatch.setenv("RANK", "0")
    assert first_to_report(wait_s=0) is False  # a rank of the same job: quiet
    assert first_to_report("interrupt", wait_s=0) is True  # another kind of message is claimed apart
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert first_to_report() is True and first_to_report() is True  # a single process always tells


def test_neva_error_is_printed_by_one_rank(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    monkeypatch.setenv("NEVA_REPORT_DIR", str(tmp_path))
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("0", "1"):  # two ranks of one job hit the same error (rank 1 waits the 1 s it gives rank 0)
        monkeypatch.setenv("RANK", rank)
        assert main(["tokenizer", "inspect", str(tmp_path / "missing.model")]) == 2
    err = capsys.readouterr().err
    assert err.count("neva: error:") == 1 and "missing.model" in err


@pytest.mark.parametrize("argv", [["-q", "data", "validate", "X"], ["data", "-q", "validate", "X"],
                                  ["data", "validate", "X", "-q"], ["--quiet", "data", "validate", "X"]])  # fmt: skip
def test_output_flags_before_or_after_the_subcommand(argv: list[str]) -> None:
    from neva_tools.cli.common import merge_output_flags

    args = build_parser().parse_args(argv)
    assert merge_output_flags(args) == -1 and args.no_progress and args.annotations == ["X"]


def test_output_flags_add_up_across_levels() -> None:
    from neva_tools.cli.common import merge_output_flags

    args = build_parser().parse_args(["-v", "train", "-v", "--no-progress"])
    assert merge_output_flags(args) == 2 and args.no_progress and args.verbose == 2
    args = build_parser().parse_args(["--no-progress", "train"])
    assert merge_output_flags(args) == 0 and args.no_progress


def test_quiet_data_validate_prints_the_result_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = [{"id": "a", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}]
    (tmp_path / "d.json").write_text(json.dumps(records))
    try:
        assert main(["-q", "data", "validate", str(tmp_path / "d.json"), "--no-decode"]) == 0
    finally:
        setup_logging(0)  # as a plain command leaves it: -q's ERROR policy would hide later tests' records
    captured = capsys.readouterr()
    assert captured.out.strip() and captured.err == ""


def test_launcher_names_the_rank_that_failed() -> None:
    failure = SimpleNamespace
    failures = {0: failure(exitcode=-signal.SIGTERM, timestamp=5), 1: failure(exitcode=2, timestamp=5)}
    assert launch.first_failure(failures) == (1, 2)  # rank 0 was stopped by torchrun because rank 1 failed
    failures = {0: failure(exitcode=1, timestamp=5), 1: failure(exitcode=-signal.SIGKILL, timestamp=4)}
    assert launch.first_failure(failures) == (1, -signal.SIGKILL)
    assert launch.failure_line(1, -signal.SIGKILL) == "neva: rank 1 was killed by SIGKILL (out of memory?)"
    assert launch.failure_line(0, 1).startswith("neva: rank 0 failed with exit status 1")
    assert launch.exit_status(-signal.SIGKILL) == 137 and launch.exit_status(2) == 2
