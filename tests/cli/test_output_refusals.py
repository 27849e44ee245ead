"""Every command that writes refuses, even with ``--overwrite``, to replace what is not an earlier output of its kind.

The refusal comes before any input is read, so most inputs below are placeholders.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

from neva_tools.cli.main import main

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"

#: command → argv template; ``{out}`` is the output under test (``OUTPUT_NAMES`` gives its name, default ``out``).
COMMANDS = {
    "convert hf-to-nemo": ["convert", "hf-to-nemo", "--input", "{hf}", "--output", "{out}"],
    "convert nemo-to-hf": ["convert", "nemo-to-hf", "--input", "{nemo}", "--output", "{out}"],
    "convert nemo-to-hf --all-checkpoints": ["convert", "nemo-to-hf", "--all-checkpoints", "{run}", "--output",
                                             "{out}"],
    "repartition": ["repartition", "--input", "{nemo}", "--output", "{out}", "--tp", "1"],
    "tokenizer add-tokens (sentencepiece)": ["tokenizer", "add-tokens", "--input", "{sp}", "--output", "{out}",
                                             "--tokens", "<x>"],
    "tokenizer add-tokens (huggingface)": ["tokenizer", "add-tokens", "--input", "{hf_tok}", "--output", "{out}",
                                           "--tokens", "<x>"],
    "tokenizer train": ["tokenizer", "train", "--input", "{text}", "--output", "{out}", "--vocab-size", "40"],
    "data preprocess (.bin)": ["data", "preprocess", "--input", "{text}", "--output-prefix", "{tmp}/c",
                               "--tokenizer", "{sp}"],
    "data preprocess (.idx)": ["data", "preprocess", "--input", "{text}", "--output-prefix", "{tmp}/c",
                               "--tokenizer", "{sp}"],
    "data pack": ["data", "pack", "{text}", "--tokenizer", "{sp}", "--template", "plain", "--max-seq-length", "64",
                  "--output", "{out}"],
    "eval": ["eval", "--model", "{nemo}", "--data", "{text}", "--output", "{out}"],
    "eval --predictions": ["eval", "--model", "{nemo}", "--data", "{text}", "--output", "{tmp}/r.json",
                           "--predictions", "{out}"],
    "generate --batch": ["generate", "--model", "{nemo}", "--batch", "{text}", "--output", "{out}"],
    "export hf-llava": ["export", "hf-llava", "--input", "{nemo}", "--output", "{out}"],
    "export hf-llava --all-checkpoints": ["export", "hf-llava", "--all-checkpoints", "{run}", "--output", "{out}"],
    "import hf-llava": ["import", "hf-llava", "--input", "{hf}", "--output", "{out}"],
    "import hf-llava --vision-dir": ["import", "hf-llava", "--input", "{hf}", "--output", "{tmp}/new.nemo",
                                     "--vision-dir", "{out}"],
}  # fmt: skip
OUTPUT_NAMES = {"data preprocess (.bin)": "c_text_document.bin", "data preprocess (.idx)": "c_text_document.idx"}

#: drop-in script → (argv template, exit status of a refusal); they always replace an existing output.
DROP_INS = {
    "convert_llama_hf_to_nemo.py": (["--input_name_or_path", "{hf}", "--output_path", "{out}"], 2),
    "convert_hf_llama_to_nemo.py": (["--in-file", "{hf}", "--out-file", "{out}"], 2),
    "megatron_change_num_partitions.py": (["--model_file", "{nemo}", "--target_file", "{out}",
                                           "--target_tensor_model_parallel_size", "1"], 2),
    "add_special_tokens_to_sentencepiece.py": (["--input_file", "{sp}", "--output_file", "{out}", "--tokens", "<x>"],
                                               2),
}  # fmt: skip


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, llama_hf: Path, sp_model: Path,
           hf_tokenizer_dir: Path) -> dict[str, Path]:  # fmt: skip
    """The inputs of the commands: a tiny HF LLM and its .nemo, tokenizers, a text file and a run directory."""
    from neva_tools.convert.hf_to_nemo import convert_hf_to_nemo

    root = tmp_path_factory.mktemp("refusal_inputs")
    text = root / "text.jsonl"
    text.write_text('{"text": "a red circle", "prompt": "hi"}\n')
    (root / "run" / "checkpoints" / "step=2").mkdir(parents=True)
    (root / "run" / "checkpoints" / "step=2" / "metadata.json").write_text("{}")
    nemo = convert_hf_to_nemo(str(llama_hf), root / "llm.nemo").output
    return {"hf": llama_hf, "nemo": nemo, "sp": sp_model, "hf_tok": hf_tokenizer_dir, "text": text,
            "run": root / "run"}  # fmt: skip


def _victim(path: Path, what: str) -> None:
    if what == "directory":
        (path / "sub").mkdir(parents=True)
        (path / "sub" / "data.txt").write_text("important\n")
    else:
        path.write_text("important\n")


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def _argv(template: list[str], inputs: dict[str, Path], out: Path) -> list[str]:
    return [arg.format(out=out, tmp=out.parent, **inputs) for arg in template]


@pytest.mark.parametrize("what", ["directory", "file"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_unrelated_output_is_refused(command: str, what: str, inputs: dict[str, Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / OUTPUT_NAMES.get(command, "out")
    _victim(out, what)
    before = _snapshot(tmp_path)
    assert main([*_argv(COMMANDS[command], inputs, out), "--overwrite", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"neva: error: output {out} is " in err and "choose another path" in err, err
    assert _snapshot(tmp_path) == before


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"dropin_{name.removesuffix('.py')}", SCRIPTS / name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("what", ["directory", "file"])
@pytest.mark.parametrize("script", list(DROP_INS))
def test_drop_in_scripts_refuse_unrelated_outputs(script: str, what: str, inputs: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / "out"
    _victim(out, what)
    before = _snapshot(tmp_path)
    template, status = DROP_INS[script]
    assert _script(script).main(_argv(template, inputs, out)) == status
    assert f"ERROR: output {out} is " in capsys.readouterr().err
    assert _snapshot(tmp_path) == before


def test_all_checkpoints_refuses_to_replace_an_unrelated_step(inputs: dict[str, Path], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    _victim(tmp_path / "out" / "step=2", "directory")
    before = _snapshot(tmp_path)
    assert main([*_argv(COMMANDS["export hf-llava --all-checkpoints"], inputs, tmp_path / "out"), "--overwrite"]) == 2
    assert f"output {tmp_path / 'out' / 'step=2'} is a directory with 1 file that is not a Hugging Face model" in (
        capsys.readouterr().err
    )
    assert _snapshot(tmp_path) == before


def test_earlier_outputs_of_the_same_kind_are_replaced(inputs: dict[str, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    nemo, hf = tmp_path / "m.nemo", tmp_path / "hf"
    for args in (COMMANDS["convert hf-to-nemo"], COMMANDS["convert nemo-to-hf"]):
        out = nemo if "hf-to-nemo" in args else hf
        argv = [*_argv(args, {**inputs, "nemo": nemo}, out), "--no-progress"]
        assert main(argv) == 0
        assert main(argv) == 2 and "already exists; pass --overwrite" in capsys.readouterr().err
        assert main([*argv, "--overwrite"]) == 0
    assert json.loads((hf / "config.json").read_text())["model_type"] == "llama"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m.nemo"]


def test_pack_refuses_an_existing_plan_without_overwrite(shapes: dict, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    plan = tmp_path / "plan.json"
    argv = ["data", "pack", str(shapes["finetune"]), "--image-folder", str(shapes["images"]), "--tokenizer",
            str(shapes["tokenizer"]), "--template", "vicuna_v1", "--max-seq-length", "2048", "--output", str(plan),
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    first = plan.read_bytes()
    assert main(argv) == 2 and f"output {plan} already exists; pass --overwrite" in capsys.readouterr().err
    assert plan.read_bytes() == first
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads(plan.read_text())["bins"] and sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]
