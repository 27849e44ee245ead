"""What a person sees: a 2-process tiny NeVA training run (``scripts/train.sh 2``) writes a few lines of ours at
default verbosity, nothing with ``-q``; a user error in it is told once, as the last line; ``neva -q generate``
prints the answer only.

Before the logging policy the default run wrote about 83 lines (library warnings and INFO lines once per rank) and
the error about 70 (torchrun's traceback after one error message per rank).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRAIN_SH = ROOT / "scripts" / "train.sh"
RECIPE = ROOT / "recipes" / "tiny_cpu" / "stage1_pretrain.yaml"
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_RUN_ID", "NEVA_LAUNCHER_PID", "NEVA_REPORT_DIR", "OMP_NUM_THREADS",
                "TRANSFORMERS_VERBOSITY", "NEVA_NO_PROGRESS")  # fmt: skip
# A line of ours: "LEVEL: ...", "LEVEL [rank R, origin]: ...", "neva: ...", or an indented continuation of one.
OURS = re.compile(r"(DEBUG|INFO|WARNING|ERROR|CRITICAL)( \[[^\]]+\])?: |neva: |  \S")


def plain_env() -> dict[str, str]:
    """This environment without any launcher's variables, running the ``neva`` of this checkout."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS and not k.startswith("SLURM_")}
    env.update(PYTHONPATH=str(ROOT), NEVA_PYTHON=sys.executable)
    return env


def lines_of(*outputs: str) -> list[str]:
    """The lines of ``outputs`` (a progress bar's redraws, joined by carriage returns, make one line)."""
    return [line for text in outputs if text for line in text.rstrip("\n").split("\n")]


def not_ours(lines: list[str]) -> list[str]:
    """The lines that are neither ours nor a progress bar's."""
    return [line for line in lines if not OURS.match(line) and "\r" not in line]


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The demo's stage 1 in small: synthetic shapes, a 320-piece tokenizer, a tiny LLaMA .nemo, a tiny open_clip."""
    from neva_tools.convert.hf_to_nemo import convert_hf_to_nemo
    from neva_tools.data import synthetic
    from neva_tools.demo import build_clip, build_llm
    from neva_tools.tokenizer.train import train_sentencepiece

    root = tmp_path_factory.mktemp("console")
    data = synthetic.make_dataset(root / "data", train=8, heldout=2, size=32)
    tok = train_sentencepiece(synthetic.corpus(), root / "tok.model", vocab_size=320)
    llm = build_llm(root / "llm_hf", tok, vocab=320, hidden=64)
    convert_hf_to_nemo(str(llm), root / "llm.nemo")
    return {"root": root, "data": data, "llm": root / "llm.nemo", "clip": build_clip(root / "clip", 32)}


def train(assets: dict[str, Any], name: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """``scripts/train.sh 2`` on the tiny demo recipe: 2 steps at TP 2."""
    command = [str(TRAIN_SH), "2", str(RECIPE), f"name={name}", f"exp_manager.exp_dir={assets['root'] / 'runs'}",
               f"model.mm_cfg.llm.from_pretrained={assets['llm']}",
               f"model.mm_cfg.vision_encoder.from_pretrained={assets['clip']}",
               f"model.data.image_folder={assets['data']['images']}",
               f"model.data.data_path={assets['data']['pretrain']}", "model.data.num_workers=0",
               "trainer.max_steps=2", "model.micro_batch_size=2", "model.global_batch_size=2", *extra]  # fmt: skip
    return run(command)


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    """``command``'s output as written (text mode would turn a progress bar's carriage returns into line ends)."""
    done = subprocess.run(command, env=plain_env(), capture_output=True, timeout=300)
    return subprocess.CompletedProcess(command, done.returncode, done.stdout.decode(errors="replace"),
                                       done.stderr.decode(errors="replace"))  # fmt: skip


@pytest.fixture(scope="module")
def default_run(assets: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return train(assets, "default")


def test_a_two_process_run_writes_a_few_lines_all_ours(default_run: subprocess.CompletedProcess[str]) -> None:
    lines = lines_of(default_run.stdout, default_run.stderr)
    assert default_run.returncode == 0, default_run.stderr[-3000:]
    assert not_ours(lines) == [], "\n".join(lines)
    assert len(lines) <= 25, "\n".join(lines)
    assert any(line.startswith("INFO: ") for line in lines)  # our messages are there
    assert not any("[rank 1" in line for line in lines)  # the other rank has nothing to warn about


def test_quiet_run_writes_nothing(assets: dict[str, Any]) -> None:
    done = train(assets, "quiet", "-q")
    lines = lines_of(done.stdout, done.stderr)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(lines) <= 3 and not any(line.startswith(("INFO", "WARNING")) for line in lines), "\n".join(lines)
    assert (assets["root"] / "runs" / "quiet" / "quiet.nemo").is_file()


def test_a_user_error_in_a_two_process_run_is_told_once_and_last(assets: dict[str, Any]) -> None:
    missing = assets["root"] / "missing.json"
    done = train(assets, "error", f"model.data.data_path={missing}")
    lines = lines_of(done.stderr)
    assert done.returncode == 2 and done.stdout == ""
    assert sum(line.startswith("neva: error:") for line in lines) == 1, done.stderr
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr
    assert lines[-1].endswith(f"{missing} does not exist") and len(lines) <= 4, done.stderr


def test_quiet_generate_prints_the_answer_only(assets: dict[str, Any],
                                               default_run: subprocess.CompletedProcess[str]) -> None:  # fmt: skip
    model = assets["root"] / "runs" / "default" / "default.nemo"
    image = next(Path(assets["data"]["images"]).glob("*.png"))
    done = run([sys.executable, "-m", "neva_tools", "-q", "generate", "--model", str(model), "--prompt",
                "What is shown?", "--image", str(image), "--max-new-tokens", "2", "--json"])  # fmt: skip
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert len(lines_of(done.stdout)) == 1 and '"answer"' in done.stdout
