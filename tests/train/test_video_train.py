"""``neva train`` on video records (issue 22): image, multi-image, video and text-only records (the synthetic
moving-shape clips) packed in one run at TP=2, through the data check, the dataset and the model."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_helpers import run_distributed
from test_neva_train import build_tiny_llm_with_vocab, train_job

from neva_tools.convert.hf_to_nemo import convert_hf_to_nemo
from neva_tools.data import synthetic
from neva_tools.tokenizer.train import train_sentencepiece


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    root = tmp_path_factory.mktemp("neva_video")
    data = synthetic.make_dataset(root / "data", train=8, heldout=2, size=32)
    videos = synthetic.make_video_dataset(root / "data", train=8, heldout=2)
    tok = train_sentencepiece(synthetic.corpus() + synthetic.video_corpus(), root / "tok.model", vocab_size=320)
    nemo = root / "llm.nemo"
    convert_hf_to_nemo(str(build_tiny_llm_with_vocab(root / "llm_hf", tok)), nemo)
    torch.manual_seed(0)
    vision_cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                  image_size=28, patch_size=7)  # fmt: skip
    CLIPVisionModel(vision_cfg).save_pretrained(str(root / "clip"))
    return {"root": root, "data": data, "videos": videos, "llm": nemo, "clip": root / "clip"}


def _common(assets: dict[str, Any], name: str) -> list[str]:
    return [f"name={name}", f"exp_manager.exp_dir={assets['root'] / 'runs'}",
            f"model.mm_cfg.llm.from_pretrained={assets['llm']}",
            f"model.mm_cfg.vision_encoder.from_pretrained={assets['clip']}",
            f"model.data.image_folder={assets['data']['images']}",
            f"model.data.video_folder={assets['videos']['videos']}", "model.data.num_workers=0",
            "trainer.enable_progress_bar=false", "model.mm_cfg.llm.model_type=vicuna_v1",
            "model.optim.sched.min_lr=1e-5", "exp_manager.checkpoint_every_n_steps=0"]  # fmt: skip


def test_packed_mixed_media_training_at_tp2(assets: dict[str, Any]) -> None:
    images = json.loads(Path(assets["data"]["finetune"]).read_text())[:6]
    first = images[0]
    multi = {"id": "two", "images": [first["image"], images[1]["image"]],
             "conversations": [{"from": "human", "value": "<image>\n<image>\nWhat colour is the first shape?"},
                               {"from": "gpt", "value": "red"}]}  # fmt: skip
    clips = json.loads(Path(assets["videos"]["video_train"]).read_text())[:6]
    text = [{"id": f"text{i}", "conversations": [{"from": "human", "value": f"Say {i}."},
                                                 {"from": "gpt", "value": f"{i}."}]} for i in range(4)]  # fmt: skip
    mixed = assets["root"] / "mixed.json"
    mixed.write_text(json.dumps([*images, multi, *clips, *text]))
    job = [
        *_common(assets, "mixed"), f"model.data.data_path={mixed}", "model.data.packing=true",
        "model.data.max_seq_length=256", "model.micro_batch_size=2", "model.global_batch_size=2",
        "trainer.max_steps=3", "model.optim.lr=1e-4", "model.tensor_model_parallel_size=2",
    ]  # fmt: skip
    out = run_distributed(train_job, 2, job, timeout=600)[0]
    rows = (assets["root"] / "runs" / "mixed" / "logs" / "loss.csv").read_text().splitlines()[1:]
    losses = [float(r.split(",")[1]) for r in rows]
    assert out and len(losses) == 3 and all(0 < x < 20 for x in losses)
