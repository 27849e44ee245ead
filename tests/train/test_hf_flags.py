"""Hugging Face style flags: ``--flag value``, ``--flag=value``, a bare ``--flag``; typed reading consumes them."""

from __future__ import annotations

import pytest

from neva_tools.errors import NevaError
from neva_tools.train.hf_flags import Flags, parse_flags


def test_parse_flags_hf_style() -> None:
    assert parse_flags(["--a", "1", "--b=x", "--bf16", "--c", "-2", "--d"]) == {"a": "1", "b": "x", "bf16": None,
                                                                                  "c": "-2", "d": None}  # fmt: skip
    assert parse_flags(["--lr", "1", "--lr", "2", "--model-max-length", "8"]) == {"lr": "2", "model_max_length": "8"}
    with pytest.raises(NevaError, match="unexpected argument 'stray'"):
        parse_flags(["stray"])


def test_typed_reading_consumes_and_names_bad_values() -> None:
    flags = Flags(parse_flags(["--bf16", "--tf32", "False", "--epochs", "3", "--lr=2e-5", "--mystery", "x"]))
    assert flags.flag("bf16") is True and flags.flag("tf32") is False and flags.flag("fp16", default=None) is None
    assert flags.num("epochs", kind=int) == 3 and flags.num("lr") == pytest.approx(2e-5)
    assert flags.take("absent", "default") == "default" and flags.left == {"mystery": "x"}  # the unknown ones
    with pytest.raises(NevaError, match=r"--epochs '3\.5' is not an integer"):
        Flags({"epochs": "3.5"}).num("epochs", kind=int)
    with pytest.raises(NevaError, match=r"--bf16 'maybe' is not a boolean"):
        Flags({"bf16": "maybe"}).flag("bf16")
