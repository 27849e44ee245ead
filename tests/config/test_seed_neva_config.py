"""The NeMo user's flow of seed 004, from a directory outside the checkout: NeMo's tokenizer script adds
``<extra_id_0..7>``, then the seed's own ``neva_config.yaml`` trains the tiny CPU model (stage 1 at TP 2 on the
seed's two devices, then stage 2 from it with NeMo's ``model.restore_from_path``), with only paths and sizes
overridden on the command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "inference"))
from dist_helpers import run_distributed
from tiny_neva import build_assets

from neva_tools.checkpoint.nemo_archive import NemoArchive
from neva_tools.config.load import ROOT

SEED = Path(__file__).parent / "fixtures" / "seed_004_neva_config.yaml"
EXTRA = [f"<extra_id_{i}>" for i in range(8)]


def seed_job(rank: int, world_size: int, overrides: list[str]) -> str | None:
    """``neva train SEED key=value ...`` in this process."""
    from neva_tools.config.load import load_config
    from neva_tools.train.run import train

    out = train(load_config(SEED, overrides))
    return str(out) if out else None


def _paths_and_sizes(assets: dict[str, Any], tokenizer: Path, data: str) -> list[str]:
    """What a user edits for the tiny model: the files, and the sizes NeMo writes by hand (all checked against the
    checkpoints: the seed's 13B sizes and its rotary_percentage 0.5 are errors for this LLaMA)."""
    return [
        f"restore_from_path={assets['llm']}", f"model.tokenizer.model={tokenizer}",
        f"model.mm_cfg.vision_encoder.from_pretrained={assets['clip']}",
        f"model.data.data_path={assets['data'][data]}", f"model.data.image_folder={assets['data']['images']}",
        "model.encoder_seq_length=512", "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=96",
        "model.num_attention_heads=4", "model.rotary_percentage=1.0", "model.mm_cfg.vision_encoder.hidden_size=32",
        "model.data.image_token_len=16", "model.mm_cfg.vision_encoder.patch_dim=7", "model.layernorm_epsilon=1e-6",
        "model.micro_batch_size=2", "model.global_batch_size=2",
        "trainer.max_steps=2", "model.optim.sched.warmup_steps=0", "model.data.num_workers=0",
    ]  # fmt: skip


def test_seed_tokenizer_step_then_its_neva_config_trains_stage1_and_stage2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assets = build_assets(tmp_path / "assets")
    work = tmp_path / "work"
    (work / "tokenizers").mkdir(parents=True)
    monkeypatch.chdir(work)
    tokenizer = work / "tokenizers" / "tokenizer_neva.model"
    step = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "add_special_tokens_to_sentencepiece.py"), "--input_file",
         str(assets["tokenizer"]), "--output_file", str(tokenizer), "--is_userdefined", "--tokens", *EXTRA],
        capture_output=True, text=True, cwd=work,
    )  # fmt: skip
    assert step.returncode == 0, step.stderr
    assert tokenizer.is_file()

    stage1 = run_distributed(seed_job, 2, _paths_and_sizes(assets, tokenizer, "pretrain"), timeout=900)[0]
    run = work / "runs" / "nemo_neva"  # NeMo's exp_dir null: runs/ in the current directory, named by exp_manager
    assert Path(stage1).resolve() == run / "nemo_neva.nemo" and (run / "logs" / "loss.csv").is_file()
    losses = [float(r.split(",")[1]) for r in (run / "logs" / "loss.csv").read_text().splitlines()[1:]]
    assert len(losses) == 2 and all(0 < v < 20 for v in losses)
    with NemoArchive(stage1) as archive:
        cfg = archive.read_config()
        assert archive.legacy_ranks() == (2, 1)  # the seed's TP 2
    assert cfg["mm_cfg"]["use_im_start_end"] is True and cfg["vocab_size"] == 328  # the 8 tokens: padded rows

    stage2_args = [*_paths_and_sizes(assets, tokenizer, "finetune"), "exp_manager.name=nemo_neva_sft",
                   "model.mm_cfg.llm.freeze=false", f"model.restore_from_path={stage1}"]  # fmt: skip
    stage2 = run_distributed(seed_job, 2, stage2_args, timeout=900)[0]
    assert Path(stage2).resolve() == work / "runs" / "nemo_neva_sft" / "nemo_neva_sft.nemo"
    with NemoArchive(stage2) as archive:
        state = archive.load_legacy(0)
        cfg2 = archive.read_config()
    assert cfg2["mm_cfg"]["pretrain_mm_mlp_adapter"] == stage1  # NeMo's restore_from_path: stage 1's projector
    embedding = state["model.embedding.word_embeddings.weight"]
    assert embedding.shape[0] == 512 // 2  # 328 tokens padded to 512 rows, half on each TP rank
