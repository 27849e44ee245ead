"""Validation and presets for the tokens users add."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from neva_tools.errors import NevaError

#: NeVA's special tokens: image patch/start/end and conversation markers (NeMo's ``<extra_id_0..7>``).
PRESETS: dict[str, list[str]] = {"neva": [f"<extra_id_{i}>" for i in range(8)]}

#: The piece types a user may add; ``user_defined`` matches inside text, ``control`` only by id.
ADDABLE_TYPES = ("user_defined", "control")


@dataclass(frozen=True)
class TokenResult:
    """What happened to one requested token."""

    token: str
    id: int
    created: bool


def resolve_tokens(tokens: Sequence[str] | None, preset: str | None) -> list[str]:
    """Combine ``--tokens`` and ``--preset``; refuse empty, whitespace and duplicate tokens."""
    result: list[str] = []
    if preset is not None:
        if preset not in PRESETS:
            raise NevaError(f"unknown preset {preset!r}; known presets: {', '.join(sorted(PRESETS))}")
        result.extend(PRESETS[preset])
    result.extend(tokens or [])
    if not result:
        raise NevaError("no tokens given: pass --tokens TOKEN [TOKEN ...] or --preset neva")
    seen: set[str] = set()
    for token in result:
        if not token.strip():
            raise NevaError(f"token {token!r} is empty or whitespace only; special tokens need visible characters")
        if any(ch.isspace() for ch in token):
            raise NevaError(f"token {token!r} contains whitespace, which tokenizers split on; remove it")
        if token in seen:
            raise NevaError(f"token {token!r} is given twice; list each token once")
        seen.add(token)
    return result
