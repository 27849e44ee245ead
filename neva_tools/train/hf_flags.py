"""Command-line flags in Hugging Face's style (``--flag value``, ``--flag=value``, a bare ``--flag`` for true), as
LLaVA's and Qwen-VL's training scripts take them: parsing, and typed reading that consumes each flag, so that what is
left over is the unknown flags."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from neva_tools.errors import NevaError

_TRUE, _FALSE = ("true", "t", "yes", "y", "1"), ("false", "f", "no", "n", "0")


def parse_flags(argv: Sequence[str]) -> dict[str, str | None]:
    """``--flag value`` / ``--flag=value`` / bare ``--flag`` (None) pairs; the last of a repeated flag wins."""
    flags: dict[str, str | None] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            raise NevaError(f"unexpected argument {token!r}: LLaVA's flags are --name value or --name=value")
        name, sep, value = token[2:].partition("=")
        if not sep:
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            value, i = (argv[i + 1], i + 1) if has_value else (None, i)  # type: ignore[assignment]
        flags[name.replace("-", "_")] = value
        i += 1
    return flags


def parse_bool(name: str, value: str | None) -> bool:
    """``--name``'s value as a boolean (a bare flag is true); anything else is a ``NevaError`` naming it."""
    if value is None:
        return True
    if value.strip().lower() in _TRUE:
        return True
    if value.strip().lower() in _FALSE:
        return False
    raise NevaError(f"--{name} {value!r} is not a boolean (True or False)")


def parse_number(name: str, value: str | None, kind: type = float) -> Any:
    """``--name``'s value as a ``kind`` (float or int); anything else is a ``NevaError`` naming it."""
    try:
        return kind(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise NevaError(f"--{name} {value!r} is not a{'n integer' if kind is int else ' number'}") from None


class Flags:
    """The parsed flags; every flag read is consumed, what is left is unknown."""

    def __init__(self, flags: dict[str, str | None]) -> None:
        self.left = dict(flags)

    def has(self, name: str) -> bool:
        return name in self.left

    def take(self, name: str, default: Any = None) -> Any:
        return self.left.pop(name) if name in self.left else default

    def flag(self, name: str, default: bool | None = None) -> bool | None:
        return parse_bool(name, self.left.pop(name)) if name in self.left else default

    def num(self, name: str, default: Any = None, kind: type = float) -> Any:
        return parse_number(name, self.left.pop(name), kind) if name in self.left else default
