"""``scripts/llava_train.py`` end to end on CPU, run from a directory outside the checkout: the LLaVA-NeXT seed's
stage-1 command line (model paths swapped for tiny ones) trains; a stage 2 from LLaVA's ``mm_projector.bin`` with
the projector frozen keeps it bit-identical while the LLM trains, for the steps and learning rates its epochs and
warmup ratio give, keeping only the newest ``--save_total_limit`` checkpoints; unknown flags fail at once."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "inference"))
from tiny_neva import build_assets

from neva_tools.checkpoint.nemo_archive import NemoArchive
from neva_tools.mappings.projector import NEMO_PREFIX

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "llava_train.py"
LLM_LAYER = "model.decoder.layers.1.mlp.linear_fc2.weight"


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    # the seed's --model_max_length 8192 needs as many positions
    return build_assets(tmp_path_factory.mktemp("llava_models"), max_position_embeddings=8192, train=16)


def _run(cwd: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *flags], cwd=cwd, capture_output=True, text=True, timeout=900)


def test_llava_next_stage1_command_line(assets: dict[str, Any], tmp_path: Path) -> None:
    """LLaVA-NeXT scripts/train/pretrain_siglip.sh, every flag as the seed gives it."""
    run_name = "llavanext-siglip-qwen-mlp2x_gelu-pretrain_blip558k_plain"
    proc = _run(
        tmp_path,
        "--deepspeed", "scripts/zero3.json",
        "--model_name_or_path", str(assets["llm"]),
        "--version", "plain",
        "--data_path", str(assets["data"]["pretrain"]),
        "--image_folder", str(assets["data"]["images"]),
        "--vision_tower", str(assets["clip"]),
        "--mm_tunable_parts=mm_mlp_adapter",
        "--mm_vision_select_layer", "-2",
        "--mm_projector_type", "mlp2x_gelu",
        "--mm_use_im_start_end", "False",
        "--mm_use_im_patch_token", "False",
        "--bf16", "True",
        "--output_dir", f"checkpoints/projectors/{run_name}",
        "--num_train_epochs", "1",
        "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "2",
        "--gradient_accumulation_steps", "4",
        "--evaluation_strategy", "no",
        "--save_strategy", "no",
        "--save_steps", "10000",
        "--learning_rate", "1e-3",
        "--weight_decay", "0.",
        "--warmup_ratio", "0.03",
        "--lr_scheduler_type", "cosine",
        "--logging_steps", "10",
        "--tf32", "True",
        "--model_max_length", "8192",
        "--gradient_checkpointing", "True",
        "--dataloader_num_workers", "16",
        "--lazy_preprocess", "True",
        "--report_to", "tensorboard",
        "--run_name", run_name,
        "--attn_implementation", "sdpa",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    command = proc.stdout.splitlines()[0]
    for override in ("model.optim.name=distributed_fused_adam", "trainer.precision=bf16", "trainer.max_steps=-1",
                     "trainer.max_epochs=1", "model.global_batch_size=32", "model.optim.sched.warmup_ratio=0.03",
                     "model.mm_cfg.llm.freeze=true", "model.mm_cfg.freeze_mm_mlp_adapter=false",
                     "model.activations_checkpoint_granularity=full", "model.data.max_seq_length=8192",
                     f"name={run_name}", "exp_manager.exp_dir=checkpoints/projectors"):  # fmt: skip
        assert f" {override}" in command, (override, command)
    assert command.startswith("neva train model.mm_cfg.llm.from_pretrained=")
    assert ("flags with no effect here: --run_name, --mm_use_im_patch_token, --evaluation_strategy, "
            "--per_device_eval_batch_size, --lazy_preprocess, --attn_implementation") in proc.stderr  # fmt: skip
    run = tmp_path / "checkpoints" / "projectors" / run_name
    assert (run / f"{run_name}.nemo").is_file() and (run / "checkpoints" / "step=1").is_dir()
    assert len((run / "logs" / "loss.csv").read_text().splitlines()) == 2  # ceil(1 epoch × 16 / 32) = 1 step
    assert "trainer.max_epochs 1 over 16 samples at global batch 32: 1 optimizer steps" in proc.stderr


def _metrics(run: Path) -> list[dict[str, str]]:
    (path,) = (run / "logs" / "csv").glob("version_*/metrics.csv")
    return [row for row in csv.DictReader(path.open()) if row.get("lr_llm")]


def test_stage2_from_mm_projector_bin_frozen_epochs_warmup_and_save_total_limit(assets: dict[str, Any],
                                                                                tmp_path: Path) -> None:  # fmt: skip
    from neva_tools.train.schedule import cosine_annealing_lr

    torch.manual_seed(5)
    shapes = {"0.weight": (64, 32), "0.bias": (64,), "2.weight": (64, 64), "2.bias": (64,)}  # LLM 64, CLIP 32
    bin_state = {f"model.mm_projector.{k}": torch.randn(shape) for k, shape in shapes.items()}
    torch.save(bin_state, tmp_path / "mm_projector.bin")
    records = json.loads(Path(assets["data"]["finetune"]).read_text())[:16]
    (tmp_path / "sft.json").write_text(json.dumps(records))
    proc = _run(tmp_path, "--model_name_or_path", str(assets["llm"]), "--version", "v1", "--data_path", "sft.json",
                "--image_folder", str(assets["data"]["images"]), "--vision_tower", str(assets["clip"]),
                "--pretrain_mm_mlp_adapter", "mm_projector.bin", "--mm_tunable_parts", "mm_language_model",
                "--output_dir", "runs/stage2", "--num_train_epochs", "2", "--per_device_train_batch_size", "4",
                "--learning_rate", "1e-3", "--warmup_ratio", "0.25", "--lr_scheduler_type", "cosine",
                "--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "2", "--logging_steps", "1",
                "--model_max_length", "256", "--nproc", "1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "runs" / "stage2"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step=6", "step=8"]  # 2×16/4 = 8 steps
    lrs = [float(row["lr_llm"]) for row in _metrics(run)]
    expected = [cosine_annealing_lr(s, max_lr=1e-3, min_lr=0.0, max_steps=8, warmup_steps=2) for s in range(8)]
    assert lrs == pytest.approx(expected, rel=1e-6) and lrs[0] == pytest.approx(1e-3 / 3)
    with NemoArchive(run / "stage2.nemo") as archive:
        final = archive.load_legacy()
    for suffix in ("0.weight", "0.bias", "2.weight", "2.bias"):  # frozen: bit-identical to the .bin
        assert torch.equal(final[NEMO_PREFIX + suffix], bin_state[f"model.mm_projector.{suffix}"]), suffix
    with NemoArchive(assets["llm"]) as archive:
        before = archive.load_legacy()[LLM_LAYER]
    assert not torch.equal(final[LLM_LAYER], before)  # the LLM trained
    assert "conversation template v1 is LLaVA's and NeMo's name for our vicuna_v1" in proc.stderr


def test_unknown_flags_are_listed_at_once(tmp_path: Path) -> None:
    proc = _run(tmp_path, "--model_name_or_path", "x.nemo", "--mm_spatial_pool_mode", "average",
                "--mm_newline_position", "grid", "--lazy_preprocess", "True")  # fmt: skip
    assert proc.returncode == 2 and not proc.stdout
    assert "--model_name_or_path x.nemo does not exist" in proc.stderr
    (tmp_path / "x.nemo").write_bytes(b"")
    (tmp_path / "clip").mkdir()
    proc = _run(tmp_path, "--model_name_or_path", "x.nemo", "--vision_tower", "clip", "--version", "plain",
                "--data_path", "d.json", "--output_dir", "o", "--mm_spatial_pool_mode", "average",
                "--mm_newline_position", "grid", "--lazy_preprocess", "True")  # fmt: skip
    assert proc.returncode == 2
    assert "unknown LLaVA training flags: --mm_spatial_pool_mode, --mm_newline_position;" in proc.stderr
    help_text = _run(tmp_path, "--help")
    assert help_text.returncode == 0 and "--nproc N" in help_text.stdout
