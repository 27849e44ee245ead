"""``neva train`` with LLaVA-NeXT AnyRes (anyres + spatial_unpad, packed rows) end to end on CPU, then the trained
``.nemo`` answering a prompt at TP=1 and TP=2 with the same tiling, layout and ``image_newline``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "inference"))
from dist_helpers import run_distributed
from tiny_neva import build_assets, train_job, train_overrides

from neva_tools.checkpoint.nemo_archive import NemoArchive
from neva_tools.data.anyres import ImageLayout
from neva_tools.mappings.projector import NEMO_PREFIX, NEWLINE
from neva_tools.model.neva import NEWLINE_SEED

PINPOINTS = "[[28,56],[56,28],[56,56]]"
SHAPES = [(56, 28), (28, 56), (40, 40), (60, 20), (20, 45)]  # (width, height)


def _anyres_data(assets: dict[str, Any], root: Path) -> tuple[Path, Path]:
    """The finetune records with their images stretched to several aspect ratios (and one two-image record)."""
    images = root / "images"
    images.mkdir(parents=True)
    records = json.loads(Path(assets["data"]["finetune"]).read_text())[:16]
    for i, record in enumerate(records):
        with Image.open(assets["data"]["images"] / record["image"]) as img:
            img.convert("RGB").resize(SHAPES[i % len(SHAPES)]).save(images / f"{i}.png")
        record["image"] = f"{i}.png"
    two = dict(records[0], id="two", image=None, images=["0.png", "1.png"])
    two["conversations"] = [{"from": "human", "value": "<image>\n<image>\nWhat colour is the shape?"},
                            records[0]["conversations"][1]]  # fmt: skip
    del two["image"]
    path = root / "anyres.json"
    path.write_text(json.dumps([*records, two]))
    return path, images


def answer_job(rank: int, world_size: int, nemo: str, image: str) -> dict[str, Any]:
    """Load the trained ``.nemo`` at TP=world_size and answer one question about ``image``."""
    from neva_tools.data.records import Turn
    from neva_tools.inference.answer import answer
    from neva_tools.inference.load import load_neva
    from neva_tools.inference.prompt import generation_prompt, user_message
    from neva_tools.model.parallel import destroy_distributed, init_distributed

    init_distributed(tp=world_size, seed=1234)
    try:
        loaded = load_neva(nemo)
        prompt = "What colour is the shape?"
        ids = generation_prompt([Turn("user", user_message(prompt, 1))], loaded.template, loaded.tokenizer,
                                im_start_end=loaded.im_start_end).input_ids  # fmt: skip
        out = answer(loaded, prompt, [image], max_new_tokens=4)
        return {"tokens": out.tokens, "prompt_length": out.prompt_length, "text_ids": len(ids),
                "newline": loaded.model.vision_projection.image_newline.detach().clone(),
                "layout": loaded.model.image_layout, "processor": loaded.image_processor.layout}  # fmt: skip
    finally:
        destroy_distributed()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("anyres")
    assets = build_assets(root)
    data, images = _anyres_data(assets, root / "anyres")
    overrides = [
        *train_overrides(assets, "anyres", 3), f"model.data.data_path={data}", f"model.data.image_folder={images}",
        "model.data.image_aspect_ratio=anyres", f"model.data.image_grid_pinpoints={PINPOINTS}",
        "model.mm_cfg.mm_patch_merge_type=spatial_unpad", "model.data.packing=true", "model.data.max_seq_length=512",
        "model.micro_batch_size=2", "model.global_batch_size=2",
    ]  # fmt: skip
    nemo = run_distributed(train_job, 1, overrides, timeout=600)[0]
    assert nemo is not None
    return {"nemo": Path(nemo), "images": images, "root": root}


def test_anyres_spatial_unpad_trains_and_saves_the_newline(run: dict[str, Any]) -> None:
    with NemoArchive(run["nemo"]) as archive:
        state = archive.load_legacy()
        cfg = archive.read_config()
    cfg = cfg.get("model", cfg)
    assert cfg["data"]["image_aspect_ratio"] == "anyres" and cfg["mm_cfg"]["mm_patch_merge_type"] == "spatial_unpad"
    assert cfg["data"]["image_grid_pinpoints"] == [[28, 56], [56, 28], [56, 56]]
    newline = state[NEWLINE.hf[0]]
    initial = torch.randn(64, generator=torch.Generator().manual_seed(NEWLINE_SEED)) / 8
    assert newline.shape == (64,) and not torch.allclose(newline.float(), initial, atol=1e-6)  # trained
    assert NEMO_PREFIX + "2.weight" in state
    rows = (run["root"] / "runs" / "anyres" / "logs" / "loss.csv").read_text().splitlines()[1:]
    assert len(rows) == 3 and all(float(r.split(",")[1]) > 0 for r in rows)


def test_trained_anyres_model_answers_alike_at_tp1_and_tp2(run: dict[str, Any]) -> None:
    image = run["images"] / "0.png"  # 56 x 28: a base view and two tiles
    tp1 = run_distributed(answer_job, 1, str(run["nemo"]), str(image), timeout=300)[0]
    tp2 = run_distributed(answer_job, 2, str(run["nemo"]), str(image), timeout=300)
    layout = tp1["layout"]
    assert isinstance(layout, ImageLayout) and layout.merge == "spatial_unpad" and layout == tp1["processor"]
    assert layout.num_tiles(28, 56) == 3
    assert tp1["prompt_length"] == tp1["text_ids"] + layout.tokens(28, 56) - 1  # the data side's count
    with NemoArchive(run["nemo"]) as archive:
        stored = archive.load_legacy()[NEWLINE.hf[0]]
    for result in (tp1, *tp2):
        torch.testing.assert_close(result["newline"], stored.to(result["newline"].dtype), rtol=0, atol=0)
        assert result["tokens"] == tp1["tokens"] and result["prompt_length"] == tp1["prompt_length"]


def test_hugging_face_export_is_llava_next(run: dict[str, Any], tmp_path: Path) -> None:
    """anyres + spatial_unpad exports as LlavaNextForConditionalGeneration with the trained image_newline (logit and
    generation parity: tests/export/test_hf_llava_next.py); one view per image (LlavaForConditionalGeneration) is
    refused."""
    from safetensors.torch import load_file

    from neva_tools.errors import NevaError
    from neva_tools.export.hf_llava import export_hf_llava

    with pytest.raises(NevaError, match=r"--format llava cannot run .*LlavaNextForConditionalGeneration"):
        export_hf_llava(run["nemo"], tmp_path / "llava", hf_format="llava")
    assert not (tmp_path / "llava").exists()
    out = export_hf_llava(run["nemo"], tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlavaNextForConditionalGeneration"]
    assert config["image_grid_pinpoints"] == [[28, 56], [56, 28], [56, 56]]
    with NemoArchive(run["nemo"]) as archive:
        stored = archive.load_legacy()[NEWLINE.hf[0]]
    exported = {k: v for f in out.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    assert torch.equal(exported["image_newline"], stored.to(exported["image_newline"].dtype))
