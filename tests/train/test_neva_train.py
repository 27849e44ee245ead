"""``neva train`` end to end on CPU: stage 1 at TP=2 (two gloo processes), stage 2 from its projector."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from dist_helpers import run_distributed

from neva_tools.checkpoint.nemo_archive import NemoArchive
from neva_tools.config.load import load_config
from neva_tools.convert.hf_to_nemo import convert_hf_to_nemo
from neva_tools.convert.nemo_to_hf import convert_nemo_to_hf
from neva_tools.data import synthetic
from neva_tools.mappings.projector import NEMO_PREFIX
from neva_tools.tokenizer.train import train_sentencepiece


def train_job(rank: int, world_size: int, overrides: list[str]) -> str | None:
    from neva_tools.config.load import load_config
    from neva_tools.train.run import train

    out = train(load_config(None, overrides))
    return str(out) if out else None


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    root = tmp_path_factory.mktemp("neva_e2e")
    data = synthetic.make_dataset(root / "data", train=16, heldout=4, size=32)
    tok = train_sentencepiece(synthetic.corpus(), root / "tok.model", vocab_size=320)
    hf = build_tiny_llm_with_vocab(root / "llm_hf", tok)
    nemo = root / "llm.nemo"
    convert_hf_to_nemo(str(hf), nemo)
    torch.manual_seed(0)
    vision_cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                  image_size=28, patch_size=7)  # fmt: skip
    CLIPVisionModel(vision_cfg).save_pretrained(str(root / "clip"))
    return {"root": root, "data": data, "llm": nemo, "clip": root / "clip"}


def build_tiny_llm_with_vocab(out: Path, tok: Path) -> Path:
    """A tiny LLaMA whose vocabulary matches the 320-piece tokenizer."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256)  # fmt: skip
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(str(out))
    (out / "tokenizer.model").write_bytes(tok.read_bytes())
    return out


def _common(assets: dict[str, Any], name: str) -> list[str]:
    return [f"name={name}", f"exp_manager.exp_dir={assets['root'] / 'runs'}",
            f"model.mm_cfg.llm.from_pretrained={assets['llm']}",
            f"model.mm_cfg.vision_encoder.from_pretrained={assets['clip']}",
            f"model.data.image_folder={assets['data']['images']}", "model.data.num_workers=0",
            "model.data.max_seq_length=128", "trainer.enable_progress_bar=false", "model.micro_batch_size=2",
            "model.global_batch_size=2", "model.optim.sched.min_lr=1e-5",
            "exp_manager.checkpoint_every_n_steps=2"]  # fmt: skip


def test_stage1_tp2_then_stage2(assets: dict[str, Any]) -> None:
    stage1 = [
        *_common(assets, "stage1"),
        f"model.data.data_path={assets['data']['pretrain']}", "model.mm_cfg.llm.model_type=plain",
        "model.tensor_model_parallel_size=2", "trainer.max_steps=4", "model.optim.lr=1e-3",
    ]  # fmt: skip
    out = run_distributed(train_job, 2, stage1, timeout=600)[0]
    run = assets["root"] / "runs" / "stage1"
    assert out == str(run / "stage1.nemo")
    assert (run / "logs" / "loss.png").is_file() and (run / "checkpoints" / "step=4").is_dir()
    with NemoArchive(out) as archive:
        assert archive.legacy_ranks() == (2, 1)
        r0, r1 = archive.load_legacy(0), archive.load_legacy(1)
        cfg = archive.read_config()
    assert set(r0) == {NEMO_PREFIX + k for k in ("0.weight", "0.bias", "2.weight", "2.bias")}  # LLM frozen: not stored
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # the projector is stored whole on every rank
    assert cfg["mm_cfg"]["llm"]["freeze"] is True and cfg["vision"]["image_size"] == 28

    stage2 = [
        *_common(assets, "stage2"),
        f"model.data.data_path={assets['data']['finetune']}", "model.mm_cfg.llm.model_type=vicuna_v1",
        f"model.mm_cfg.pretrain_mm_mlp_adapter={out}", "model.mm_cfg.llm.freeze=false", "trainer.max_steps=2",
        "model.optim.lr=1e-4", "model.data.max_seq_length=256",
    ]  # fmt: skip
    out2 = run_distributed(train_job, 1, stage2, timeout=600)[0]
    with NemoArchive(out2) as archive:
        state = archive.load_legacy()
    assert "model.decoder.layers.1.mlp.linear_fc2.weight" in state and NEMO_PREFIX + "2.bias" in state
    summary = convert_nemo_to_hf(out2, assets["root"] / "stage2_hf")  # the stored tokenizer section is consistent
    assert (assets["root"] / "stage2_hf" / "config.json").is_file() and summary is not None
    saved = load_config(assets["root"] / "runs" / "stage2" / "config.yaml", [])
    assert saved.name == "stage2" and saved.model.mm_cfg.pretrain_mm_mlp_adapter == out


def test_tiny_neva_learns_synthetic_captions(assets: dict[str, Any]) -> None:
    """On the synthetic image-caption set the training loss falls well below its start."""
    job = [
        *_common(assets, "learn"),
        f"model.data.data_path={assets['data']['pretrain']}", "model.mm_cfg.llm.model_type=plain",
        "model.mm_cfg.llm.freeze=false", "trainer.max_steps=150", "model.optim.lr=3e-3",
        "model.optim.sched.warmup_steps=10", "model.micro_batch_size=4", "model.global_batch_size=4",
        "exp_manager.checkpoint_every_n_steps=0",
    ]  # fmt: skip
    run_distributed(train_job, 1, job, timeout=900)
    rows = (assets["root"] / "runs" / "learn" / "logs" / "loss.csv").read_text().splitlines()[1:]
    losses = [float(r.split(",")[1]) for r in rows]
    start, end = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert len(losses) == 150 and end < 0.3 * start, (start, end)


def test_packed_finetuning_with_text_only_records_at_tp2(assets: dict[str, Any]) -> None:
    """``model.data.packing=true`` on a mix of image records and text-only records (batches of either), two TP ranks."""
    import json

    records = json.loads(Path(assets["data"]["finetune"]).read_text())[:8]
    text_only = [{"id": f"text{i}", "conversations": [{"from": "human", "value": f"Say the number {i}."},
                                                       {"from": "gpt", "value": f"The number is {i}."}]}
                 for i in range(6)]  # fmt: skip
    mixed = assets["root"] / "mixed.json"
    mixed.write_text(json.dumps(records + text_only))
    job = [
        *_common(assets, "packed"),
        f"model.data.data_path={mixed}", "model.mm_cfg.llm.model_type=vicuna_v1", "model.data.packing=true",
        "trainer.max_steps=3", "model.optim.lr=1e-4", "model.data.max_seq_length=256",
        "model.tensor_model_parallel_size=2", "exp_manager.checkpoint_every_n_steps=0",
    ]  # fmt: skip
    out = run_distributed(train_job, 2, job, timeout=600)[0]
    rows = (assets["root"] / "runs" / "packed" / "logs" / "loss.csv").read_text().splitlines()[1:]
    losses = [float(r.split(",")[1]) for r in rows]
    assert out and len(losses) == 3 and all(0 < x < 20 for x in losses)
