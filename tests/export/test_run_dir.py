"""``--all-checkpoints RUN_DIR``: one Hugging Face directory per saved step, converted once."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from dist_helpers import in_process_distributed
from neva_models import build_model, safetensors_of

from neva_tools.cli.main import main
from neva_tools.errors import NevaError
from neva_tools.export.hf_llava import write_llava
from neva_tools.export.run_dir import convert_all

BIAS = "multi_modal_projector.linear_2.bias"


@pytest.fixture(scope="module")
def run_dir(neva_nemo: Path, hf_clip: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A finished run: ``step=2`` (projector bias + 0.5), ``step=4`` (the final weights) and ``run.nemo``.

    The checkpoints are written by ``neva_tools.train.checkpoint.save`` from our model holding ``neva_nemo``.
    """
    from neva_tools.train import checkpoint

    run = tmp_path_factory.mktemp("runs") / "run"
    with in_process_distributed(tp=1):
        model = build_model(str(neva_nemo), str(hf_clip))
        bias = model.vision_projection.encoder.linear_fc2.bias
        final = bias.detach().clone()
        with torch.no_grad():
            bias.copy_(final + 0.5)
            checkpoint.save(run / "checkpoints" / "step=2", model, None, {"global_step": 2})
            bias.copy_(final)
            checkpoint.save(run / "checkpoints" / "step=4", model, None, {"global_step": 4})
        shutil.copyfile(neva_nemo, run / "run.nemo")
        yield run


def test_every_checkpoint_once(run_dir: Path, exported: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    first = convert_all(run_dir, out, write_llava)
    assert [(r.output.name, r.converted) for r in first] == [("step=2", True), ("step=4", True)]
    final, step2 = safetensors_of(out / "step=4"), safetensors_of(out / "step=2")
    reference = safetensors_of(exported)
    assert final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in final)
    assert [k for k in final if not torch.equal(final[k], step2[k])] == [BIAS]
    assert torch.allclose(step2[BIAS], final[BIAS] + 0.5)
    assert (out / "step=2" / "processor_config.json").is_file()
    again = convert_all(run_dir, out, write_llava)
    assert [(r.output.name, r.converted) for r in again] == [("step=2", False), ("step=4", False)]


def test_a_run_without_final_nemo_takes_the_training_config(run_dir: Path, llm_nemo: Path, hf_clip: Path,
                                                            exported: Path, tmp_path: Path) -> None:  # fmt: skip
    running = tmp_path / "running"
    shutil.copytree(run_dir / "checkpoints" / "step=4", running / "checkpoints" / "step=4")
    with pytest.raises(NevaError, match=r"exactly one final \.nemo.*has none.*--config"):
        convert_all(running, tmp_path / "out", write_llava)
    overrides = [f"model.mm_cfg.llm.from_pretrained={llm_nemo}", "model.mm_cfg.llm.model_type=vicuna_v1",
                 f"model.mm_cfg.vision_encoder.from_pretrained={hf_clip}"]  # fmt: skip
    results = convert_all(running, tmp_path / "out", write_llava, overrides=overrides)
    got, reference = safetensors_of(results[0].output), safetensors_of(exported)
    assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in got)


def test_nemo_to_hf_all_checkpoints(run_dir: Path, llm_nemo: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from neva_tools.convert.nemo_to_hf import convert_nemo_to_hf

    args = ["convert", "nemo-to-hf", "--all-checkpoints", str(run_dir), "--output", str(tmp_path / "llm")]
    assert main([*args, "--no-progress"]) == 0
    assert main([*args, "--no-progress"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-2:] == [f"step=2: already converted, kept {tmp_path / 'llm' / 'step=2'}",
                            f"step=4: already converted, kept {tmp_path / 'llm' / 'step=4'}"]  # fmt: skip
    reference = convert_nemo_to_hf(llm_nemo, tmp_path / "llm_ref").output  # the LLM the run started from
    got, ref = safetensors_of(tmp_path / "llm" / "step=4"), safetensors_of(reference)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in got)
    assert (tmp_path / "llm" / "step=4" / "config.json").read_text() == (reference / "config.json").read_text()
    assert (tmp_path / "llm" / "step=4" / "tokenizer.model").is_file()
