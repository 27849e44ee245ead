"""A tiny ``neva train`` with LLaVA's ``--group_by_modality_length True --mm_use_im_start_end True`` settings on mixed
image and text-only records: every optimizer step sees one modality, an epoch is whole global batches per modality,
images are wrapped in ``<im_start>``/``<im_end>``, and the saved ``.nemo`` makes inference wrap them the same way."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "inference"))
from dist_helpers import run_distributed
from tiny_neva import build_assets

from neva_tools.checkpoint.nemo_archive import NemoArchive
from neva_tools.checkpoint.nemo_tensors import model_config

IM_START, IM_END = 320, 321  # the ids of <im_start>, <im_end> added to the 320-piece tokenizer


def train_recorded(rank: int, world_size: int, overrides: list[str]) -> tuple[str | None, list[dict[str, Any]]]:
    """``neva train`` in this process, recording every collated micro batch (ids, image count, wrap check)."""
    import neva_tools.data.dataset as dataset
    from neva_tools.config.load import load_config
    from neva_tools.data.templates import IMAGE_TOKEN_INDEX
    from neva_tools.train.run import train

    seen: list[dict[str, Any]] = []
    collate = dataset.collate

    def recording(batch: Any, pad_id: int = 0) -> dict[str, Any]:
        out = collate(batch, pad_id)
        rows, cols = (out["input_ids"] == IMAGE_TOKEN_INDEX).nonzero(as_tuple=True)
        seen.append({"ids": list(out["ids"]), "images": len(out["images"]),
                     "before": out["input_ids"][rows, cols - 1].tolist(),
                     "after": out["input_ids"][rows, cols + 1].tolist()})  # fmt: skip
        return out

    dataset.collate = recording  # run.py imports collate when it builds the loader
    out = train(load_config(None, overrides))
    return (str(out) if out else None), seen


def loaded_wrap(rank: int, world_size: int, nemo: str) -> tuple[Any, list[int]]:
    """What ``neva generate`` loads: the image wrap and a generation prompt's ids."""
    from neva_tools.data.records import Turn
    from neva_tools.inference.load import load_neva
    from neva_tools.inference.prompt import generation_prompt
    from neva_tools.model.parallel import destroy_distributed, init_distributed

    init_distributed(tp=1)
    try:
        loaded = load_neva(nemo)
        turns = [Turn("user", "<image>\nWhat colour is the shape?")]
        prompt = generation_prompt(turns, loaded.template, loaded.tokenizer, im_start_end=loaded.im_start_end)
        return loaded.im_start_end, prompt.input_ids
    finally:
        destroy_distributed()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from neva_tools.tokenizer.add_tokens import add_tokens

    assets = build_assets(tmp_path_factory.mktemp("llava_batching"), train=9)
    root = assets["root"]
    tok = add_tokens(assets["tokenizer"], root / "tok_llava.model", ["<im_start>", "<im_end>"]).output
    images = json.loads(Path(assets["data"]["finetune"]).read_text())[:9]
    texts = [{"id": f"txt-{i}", "conversations": [{"from": "human", "value": f"Is a {c} circle {c}? Answer with one "
                                                                             "word."}, {"from": "gpt", "value": c}]}
             for i, c in enumerate(("red", "blue", "green"))]  # fmt: skip
    data = root / "mixed.json"
    data.write_text(json.dumps(images[:4] + texts + images[4:]))
    overrides = [
        "name=grouped", f"exp_manager.exp_dir={root / 'runs'}", f"model.mm_cfg.llm.from_pretrained={assets['llm']}",
        f"model.mm_cfg.vision_encoder.from_pretrained={assets['clip']}", f"model.tokenizer.model={tok}",
        f"model.data.image_folder={assets['data']['images']}", f"model.data.data_path={data}",
        "model.data.num_workers=0", "model.data.max_seq_length=256", "trainer.enable_progress_bar=false",
        "model.micro_batch_size=2", "model.global_batch_size=4", "model.mm_cfg.llm.model_type=vicuna_v1",
        "model.mm_cfg.llm.freeze=false", "trainer.max_steps=-1", "trainer.max_epochs=1", "model.optim.lr=1e-3",
        "model.optim.sched.min_lr=1e-4", "exp_manager.checkpoint_every_n_steps=0",
        "model.data.group_by_modality_length=true", "model.mm_cfg.use_im_start_end=true",
        "model.mm_cfg.im_start_end_tokens=[<im_start>,<im_end>]",
    ]  # fmt: skip
    out, seen = run_distributed(train_recorded, 1, overrides, timeout=900)[0]
    return {"root": root, "out": out, "seen": seen}


def test_every_step_holds_one_modality_for_whole_batches_per_modality(run: dict[str, Any]) -> None:
    losses = (run["root"] / "runs" / "grouped" / "logs" / "loss.csv").read_text().splitlines()[1:]
    assert len(losses) == 4  # 9 images → 3 global batches of 4, 3 texts → 1: 16 samples (12 without grouping: 3)
    seen = run["seen"]
    assert len(seen) == 8  # 4 steps × 2 accumulated micro batches
    kinds = []
    for step in range(4):
        ids = [i for micro in seen[2 * step : 2 * step + 2] for i in micro["ids"]]
        text = [i.startswith("txt-") for i in ids]
        assert len(set(text)) == 1, ids
        kinds.append(text[0])
        assert sum(m["images"] for m in seen[2 * step : 2 * step + 2]) == (0 if text[0] else 4)
    assert kinds.count(True) == 1
    assert {i for m in seen for i in m["ids"]} >= {"txt-0", "txt-1", "txt-2"}


def test_images_are_wrapped_in_llavas_tokens_in_training_and_inference(run: dict[str, Any]) -> None:
    wrapped = [m for m in run["seen"] if m["images"]]
    assert wrapped and all(m["before"] == [IM_START] * m["images"] for m in wrapped)
    assert all(m["after"] == [IM_END] * m["images"] for m in wrapped)
    with NemoArchive(run["out"]) as archive:
        cfg = model_config(archive)
    assert cfg["mm_cfg"]["im_start_end_tokens"] == ["<im_start>", "<im_end>"]
    assert cfg["data"]["group_by_modality_length"] is True
    wrap, prompt = run_distributed(loaded_wrap, 1, run["out"], timeout=600)[0]
    assert tuple(wrap) == ("<im_start>", "<im_end>")
    at = prompt.index(-200)
    assert prompt[at - 1 : at + 2] == [IM_START, -200, IM_END]
