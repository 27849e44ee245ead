"""A tiny NeVA learns a synthetic video task from the frames (issue 22): which way a shape moves in a clip, answered
well above chance on held-out clips. The clips go through the product's video path (PyAV decoding, frame sampling,
``NevaDataset``, megatron-core's ``LLaVAModel`` with OneVision pooling); accuracy is the likelihood choice among the
four directions, as ``neva eval``'s choice metric scores it."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from dist_helpers import in_process_distributed
from neva_tiny import IMAGE, LLM, PATCH, vision_config

from neva_tools.data import synthetic
from neva_tools.data.dataset import NevaDataset, collate
from neva_tools.data.images import ImageProcessor
from neva_tools.data.registry import DatasetSpec, DatasetUse
from neva_tools.data.video import VideoSampling
from neva_tools.inference.scoring import token_nll
from neva_tools.tokenizer.train import train_sentencepiece

VOCAB = 320
STEPS = 600  # about 10 s of training on two quiet cores


def _dataset(path: Path, root: Path, tok: Path) -> NevaDataset:
    processor = ImageProcessor.for_encoder("clip", IMAGE, "pad")
    sampling = VideoSampling(base_interval=2.0, min_frames=2, max_frames=2)
    use = DatasetUse(DatasetSpec("v", path, root / "videos", "plain"))
    return NevaDataset([use], tok, processor, image_tokens=16, video=sampling, video_folder=root / "videos")


def _choice_accuracy(model: torch.nn.Module, root: Path, tok: Path, split: str) -> float:
    records = json.loads((root / f"{split}.json").read_text())
    directions = list(synthetic.MOTIONS)
    flat = [{**r, "conversations": [r["conversations"][0], {"from": "gpt", "value": d}]}
            for r in records for d in directions]  # fmt: skip
    path = root / f"{split}_candidates.json"
    path.write_text(json.dumps(flat))
    data = _dataset(path, root, tok)
    items = [data[i] for i in range(len(data))]
    model.eval()
    with torch.no_grad():
        nll = torch.cat([token_nll(model, collate(items[i : i + 64]), VOCAB).sum(1) for i in range(0, len(items), 64)])
    truth = torch.tensor([directions.index(r["conversations"][1]["value"]) for r in records])
    return float((nll.view(-1, len(directions)).argmin(1) == truth).float().mean())


def test_tiny_model_learns_the_direction_a_shape_moves(tmp_path: Path) -> None:
    tok = train_sentencepiece(synthetic.corpus() + synthetic.video_corpus(), tmp_path / "tok.model", vocab_size=VOCAB)
    synthetic.make_video_dataset(tmp_path, train=256, heldout=64, frames=8, fps=4, size=IMAGE, seed=0)
    with in_process_distributed(seed=0):
        torch.manual_seed(0)
        from neva_tools.model.neva import NevaParts, build_neva_model, freeze

        llm = {**LLM, "encoder_seq_length": 256, "max_position_embeddings": 256, "tensor_model_parallel_size": 1}
        model = build_neva_model(NevaParts(llm, VOCAB, vision_config(1), IMAGE, PATCH))
        freeze(model, llm=False, vision=True)
        train = _dataset(tmp_path / "video_train.json", tmp_path, tok)
        items = [train[i] for i in range(len(train))]
        before = _choice_accuracy(model, tmp_path, tok, "video_heldout")
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10))
        rng = random.Random(0)
        model.train()
        for _ in range(STEPS):
            b = collate(rng.sample(items, 16))
            out, mask = model(b["images"], b["input_ids"], b["position_ids"], None, labels=b["labels"],
                              loss_mask=b["loss_mask"], num_image_tiles=b["num_image_tiles"],
                              image_sizes=b["image_sizes"])  # fmt: skip
            loss = (out.float() * mask).sum() / mask.sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            warmup.step()
        held_out = _choice_accuracy(model, tmp_path, tok, "video_heldout")
    print(f"held-out direction accuracy: {held_out:.3f} (before training {before:.3f}, chance 0.25)")
    assert held_out >= 0.45, (before, held_out)  # seeds 0, 1, 2 reach 0.98, 0.50, 1.0 (1: two directions confused)
