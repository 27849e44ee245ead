"""``nemo-to-hf --all-checkpoints`` on a text-pretraining run (the LLM alone): one LlamaForCausalLM per step."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from dist_helpers import in_process_distributed
from neva_models import safetensors_of

from neva_tools.cli.main import main
from neva_tools.errors import NevaError
from neva_tools.export.run_dir import convert_all, write_llm

NORM = "model.norm.weight"


@pytest.fixture(scope="module")
def text_run(llm_nemo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A finished text run: ``step=2`` (final norm + 0.5), ``step=4`` (the LLM's weights) and its GPT ``.nemo``.

    The checkpoints are written by ``neva_tools.train.checkpoint.save`` from the GPT model ``train_text`` trains.
    """
    from neva_tools.model.from_nemo import load_gpt_from_nemo
    from neva_tools.train import checkpoint

    run = tmp_path_factory.mktemp("runs") / "tiny_text"
    with in_process_distributed(tp=1):
        model = load_gpt_from_nemo(llm_nemo)[0]
        norm = model.decoder.final_layernorm.weight
        final = norm.detach().clone()
        with torch.no_grad():
            norm.copy_(final + 0.5)
            checkpoint.save(run / "checkpoints" / "step=2", model, None, {"global_step": 2})
            norm.copy_(final)
            checkpoint.save(run / "checkpoints" / "step=4", model, None, {"global_step": 4})
    shutil.copyfile(llm_nemo, run / "tiny_text.nemo")  # what train_text writes at the end: a GPT .nemo
    yield run


@pytest.fixture(scope="module")
def reference(llm_nemo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from neva_tools.convert.nemo_to_hf import convert_nemo_to_hf

    return convert_nemo_to_hf(llm_nemo, tmp_path_factory.mktemp("ref") / "hf").output


def test_every_checkpoint_becomes_a_llama(text_run: Path, reference: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    import transformers

    out = tmp_path / "hf"
    assert (
        main(["convert", "nemo-to-hf", "--all-checkpoints", str(text_run), "--output", str(out), "--no-progress"]) == 0
    )
    got, step2, ref = safetensors_of(out / "step=4"), safetensors_of(out / "step=2"), safetensors_of(reference)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in got)
    assert [k for k in got if not torch.equal(got[k], step2[k])] == [NORM]
    assert torch.equal(step2[NORM], ref[NORM] + 0.5)
    assert (out / "step=4" / "config.json").read_text() == (reference / "config.json").read_text()
    assert (out / "step=2" / "tokenizer.model").is_file()
    model = transformers.LlamaForCausalLM.from_pretrained(str(out / "step=2"))
    assert torch.equal(model.model.norm.weight.detach(), step2[NORM])
    capsys.readouterr()
    assert (
        main(["convert", "nemo-to-hf", "--all-checkpoints", str(text_run), "--output", str(out), "--no-progress"]) == 0
    )
    assert "step=4: already converted" in capsys.readouterr().out


def test_a_running_text_run_takes_its_training_config(text_run: Path, llm_nemo: Path, reference: Path,
                                                       tmp_path: Path) -> None:  # fmt: skip
    running = tmp_path / "running"
    shutil.copytree(text_run / "checkpoints" / "step=4", running / "checkpoints" / "step=4")
    overrides = ["model.text_pretrain.enabled=true", f"model.mm_cfg.llm.from_pretrained={llm_nemo}"]
    results = convert_all(running, tmp_path / "out", write_llm, overrides=overrides)
    got, ref = safetensors_of(results[0].output), safetensors_of(reference)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in got)


def test_hf_llava_export_of_a_text_run_says_what_to_use(text_run: Path, tmp_path: Path) -> None:
    from neva_tools.export.hf_llava import write_llava

    def write(source: object, output: Path) -> Path:
        return write_llava(source, output, template="vicuna_v1")

    with pytest.raises(NevaError, match=r"is a text-pretraining checkpoint \(the LLM alone\).*nemo-to-hf"):
        convert_all(text_run, tmp_path / "llava", write)
    assert not (tmp_path / "llava" / "step=2").exists()
