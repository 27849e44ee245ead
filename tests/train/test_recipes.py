"""Every recipe under recipes/ (found recursively) loads over the base config and passes offline validation, and so
does every ``scripts/train.sh`` command of its header (the recipe it names, its overrides, its process count)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from neva_tools.config.load import load_config
from neva_tools.train.validate import check_config

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
_LAUNCH = re.compile(r"scripts/train\.sh\s+(\d+|slurm)\s+(\S+)")


def header_commands(text: str) -> list[tuple[int | None, str, list[str]]]:
    """(processes per node, recipe path, key=value overrides) of each scripts/train.sh command in the header."""
    lines = [line[1:].strip() for line in text.splitlines() if line.startswith("#")]
    joined = " ".join(lines).replace("\\ ", " ")  # shell line continuations
    matches = list(_LAUNCH.finditer(joined))
    commands = []
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(joined)
        overrides = []
        for word in (w.strip("\"'") for w in joined[match.end() : end].split()):
            if not re.fullmatch(r"[\w.]+=\S+", word):
                break  # the end of this command (the next comment sentence)
            if "$" not in word:  # shell variables are the user's to fill in
                overrides.append(word)
        slurm = re.findall(r"--ntasks-per-node=(\d+)", joined[: match.start()][-120:])
        devices = int(match.group(1)) if match.group(1) != "slurm" else (int(slurm[-1]) if slurm else None)
        commands.append((devices, match.group(2), overrides))
    return commands


def test_recipes_are_found() -> None:
    names = {f"{p.parent.name}/{p.stem}" for p in RECIPES}
    families = ["llama2_7b", "llama2_13b", "llama3_8b", "mistral_7b", "vicuna1.5_7b", "qwen2.5_0.5b", "qwen2.5_7b"]
    for family in families:
        assert {f"{family}/stage1_pretrain", f"{family}/stage2_finetune"} <= names, family
    assert {"tiny_cpu/stage1_pretrain", "tiny_cpu/stage2_finetune", "llama2_7b/stage1_pretrain_clip224"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_loads_and_validates_offline(recipe: Path) -> None:
    text = recipe.read_text()
    assert text.startswith("#") and "Launch" in text and "Override example" in text  # the header comment
    assert check_config(load_config(recipe), offline=True) == []
    commands = header_commands(text)
    assert len(commands) >= 2, "the header needs a launch command and an override example"
    for devices, path, overrides in commands:
        assert path == str(recipe.relative_to(ROOT)), f"the header launches {path}"
        problems = check_config(load_config(ROOT / path, overrides), offline=True, devices=devices)
        assert problems == [], (devices, overrides, problems)


def test_header_commands_are_parsed() -> None:
    text = ("# Launch:\n#   scripts/train.sh 8 recipes/a.yaml\n# Override example:\n#   sbatch -N 2 "
            "--ntasks-per-node=4 scripts/train.sh slurm \\\n#     recipes/a.yaml trainer.num_nodes=2 \"name=$N\" "
            "a.b=1\n# (a sentence: it ends the command)\n")  # fmt: skip
    expected = [(8, "recipes/a.yaml", []), (4, "recipes/a.yaml", ["trainer.num_nodes=2", "a.b=1"])]
    assert header_commands(text) == expected


def test_recipe_batch_sizes_fit_their_launch() -> None:
    """The launch line's process count matters: TP 4 on 8 GPUs is DP 2, so 256 = 32 × 2 × 4 accumulation steps."""
    recipe = ROOT / "recipes" / "vicuna1.5_7b" / "stage1_pretrain.yaml"
    assert check_config(load_config(recipe), devices=8) == []
    problems = check_config(load_config(recipe, ["model.global_batch_size=288"]), devices=8)
    expected = (
        "global_batch_size (288) must be divisible by micro_batch_size (32) × data-parallel size (2) "
        "(world size 8 = 8 processes per node × trainer.num_nodes 1; model.tensor_model_parallel_size 4)"
    )
    assert expected in problems, problems
