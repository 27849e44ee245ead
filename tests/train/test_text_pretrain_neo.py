"""NEO's text-pretraining workflow end to end, run from a user directory outside the checkout (cwd = tmp_path):

preprocess_data.py and count_mmap_token.py with the seed's command lines, a NEO mixture_cfg.yml (GLOBAL_BATCH_SIZE,
SEQ_LEN, N_ROUND) planned by ``neva data mixture`` and given as ``model.text_pretrain.data_path`` (its TRAIN_ITERS
becomes trainer.max_steps), a tiny run, and every checkpoint converted to Hugging Face (NEO's batch_convert_ckpt.sh).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))
from builders import caption_corpus, text_pretrain_assets
from dist_helpers import run_distributed
from neva_models import safetensors_of

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "text_pretrain" / "tiny_cpu.yaml"
STEPS = 6  # the mixture's TRAIN_ITERS: the run must train exactly this many steps


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "NEVA_NO_PROGRESS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc


def neo_train(rank: int, world_size: int, recipe: str, overrides: list[str]) -> dict[str, Any]:
    """``neva train RECIPE OVERRIDES`` in this rank's process; the final .nemo and the logged steps."""
    from neva_tools.config.load import load_config
    from neva_tools.train.run import train

    cfg = load_config(recipe, overrides)
    nemo = train(cfg)
    logs = Path(cfg.exp_manager.exp_dir) / cfg.name / "logs"
    return {"nemo": str(nemo), "steps": len((logs / "loss.csv").read_text().splitlines()) - 1}


@pytest.fixture(scope="module")
def neo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The user's directory after the data steps: the corpus, its mmap pair and mixture_cfg.yml."""
    assets = text_pretrain_assets(tmp_path_factory.mktemp("assets"))
    home = tmp_path_factory.mktemp("neo_user")
    lines = [{"src": "www.nvidia.com", "text": "The quick brown fox", "type": "Eng", "id": "0", "title": "First Part"},
             {"src": "The Internet", "text": "jumps over the lazy dog", "type": "Eng", "id": "42",
              "title": "Second Part"}]  # fmt: skip
    lines += [{"src": "captions", "text": text, "id": str(i)} for i, text in enumerate(caption_corpus())]
    (home / "my-corpus.json").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (home / "neo").mkdir()
    shutil.copyfile(Path(assets["root"]) / "tok.model", home / "neo" / "tokenizer.model")

    _run(home, str(ROOT / "scripts" / "preprocess_data.py"), "--input", "my-corpus.json", "--output-prefix",
         "my-corpus", "--tokenizer-model", "neo/tokenizer.model", "--tokenizer-type", "SentencePieceTokenizer",
         "--keep-sequential-samples", "--append-eod")  # fmt: skip
    counted = _run(home, str(ROOT / "scripts" / "count_mmap_token.py"), "--mmap_path", "my-corpus_text_document")
    tokens = int(re.search(r"Total number of tokens:\s+(\d+)", counted.stdout).group(1))
    rounds = (STEPS - 0.5) * 4 * 32 / tokens  # N of N_ROUND such that ceil(tokens × N / (4 × 32)) = STEPS
    (home / "mixture_cfg.yml").write_text(f"GLOBAL_BATCH_SIZE: 4\nSEQ_LEN: 32\n\n{rounds:.6f}_ROUND:\n"
                                          "  - my-corpus_text_document.bin\n")  # fmt: skip
    planned = _run(home, "-m", "neva_tools", "data", "mixture", "mixture_cfg.yml")
    return {"assets": assets, "home": home, "plan": planned.stdout}


def test_the_mixture_plans_train_iters(neo: dict[str, Any]) -> None:
    home = neo["home"]
    assert f"TRAIN_ITERS={STEPS}\n" in neo["plan"]
    assert f'DATA_PATH="1 {home / "my-corpus_text_document"}"' in neo["plan"]


def test_a_run_on_the_mixture_yaml_trains_train_iters_steps_and_converts(neo: dict[str, Any]) -> None:
    from neva_tools.convert.nemo_to_hf import convert_nemo_to_hf

    home, assets = neo["home"], neo["assets"]
    recipe = yaml.safe_load(RECIPE.read_text())  # a NEO user's recipe: length, batch and sequence from the YAML
    del recipe["trainer"]["max_steps"], recipe["model"]["global_batch_size"]
    del recipe["model"]["text_pretrain"]["seq_length"]
    recipe["exp_manager"]["checkpoint_every_n_steps"] = 2
    (home / "neo_recipe.yaml").write_text(yaml.safe_dump(recipe))
    overrides = ["name=neo_tiny", f"exp_manager.exp_dir={home / 'runs'}", f"model.mm_cfg.llm.from_pretrained="
                 f"{assets['llm']}", f"model.text_pretrain.data_path={home / 'mixture_cfg.yml'}",
                 "model.text_pretrain.eval_interval=0"]  # fmt: skip
    result = run_distributed(neo_train, 1, str(home / "neo_recipe.yaml"), overrides, timeout=600)[0]
    assert result["steps"] == STEPS
    run = home / "runs" / "neo_tiny"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step=2", "step=4", "step=6"]

    _run(home, "-m", "neva_tools", "convert", "nemo-to-hf", "--all-checkpoints", "runs/neo_tiny", "--output", "hf")
    assert sorted(p.name for p in (home / "hf").iterdir()) == ["step=2", "step=4", "step=6"]
    final = convert_nemo_to_hf(result["nemo"], home / "final_hf").output
    got, ref = safetensors_of(home / "hf" / "step=6"), safetensors_of(final)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in got)
    first = safetensors_of(home / "hf" / "step=2")
    assert not torch.equal(first["model.norm.weight"], got["model.norm.weight"])  # the steps differ: it trained
