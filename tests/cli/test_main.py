"""The ``neva`` entry point: help for every command, version, error reporting."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from neva_tools import __version__
from neva_tools.cli.main import build_parser, main


def _all_command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths.append((*prefix, name))
                paths.extend(_all_command_paths(sub, (*prefix, name)))
    return paths


COMMANDS = _all_command_paths(build_parser())


def test_top_level_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    top = {path[0] for path in COMMANDS}
    assert top and all(name in out for name in top)


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_every_subcommand_has_help(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*path, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: neva {' '.join(path)}" in out
    assert "--no-progress" in out


def test_expected_tokenizer_actions_present() -> None:
    assert {("tokenizer", a) for a in ("add-tokens", "inspect", "train")} <= set(COMMANDS)


def test_console_script_version() -> None:
    exe = [sys.executable, "-m", "neva_tools", "--version"]
    out = subprocess.run(exe, capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"neva {__version__}"


def test_user_error_is_one_line_without_traceback(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["tokenizer", "inspect", str(tmp_path / "missing.model")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("neva: error:") and "missing.model" in err and "Traceback" not in err
