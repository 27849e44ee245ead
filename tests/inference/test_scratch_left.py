"""``neva generate`` leaves nothing in $TMPDIR: the tokenizer it extracts from the ``.nemo`` goes with the process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def test_generate_leaves_nothing_in_tmpdir(neva_run: dict[str, Any], tmp_path: Path) -> None:
    image = neva_run["data"]["images"] / "00025.png"
    env = {**{k: v for k, v in os.environ.items() if k != "NEVA_TEST_KILL_AT"}, "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "neva_tools", "generate", "--model", str(neva_run["nemo"]), "--image",
                           str(image), "--prompt", "Where is the shape?", "--max-new-tokens", "2", "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert os.listdir(tmp_path) == []
