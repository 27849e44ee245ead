"""``neva train`` with a Hugging Face SigLIP vision encoder (no class token, [-1, 1] normalisation), one process."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from builders import build_tiny_llm
from dist_helpers import run_distributed

from neva_tools.checkpoint.nemo_archive import NemoArchive
from neva_tools.convert.hf_to_nemo import convert_hf_to_nemo
from neva_tools.data import synthetic
from neva_tools.mappings.projector import NEMO_PREFIX
from neva_tools.tokenizer.train import train_sentencepiece


def train_job(rank: int, world_size: int, overrides: list[str]) -> dict[str, Any]:
    """``neva train`` with ``overrides``; also what the run's vision encoder and image processor were."""
    from neva_tools.config.load import load_config
    from neva_tools.data.images import ImageProcessor
    from neva_tools.train.run import train

    seen: dict[str, Any] = {}
    original = ImageProcessor.for_encoder.__func__  # type: ignore[attr-defined]

    def spy(cls: type, vision_model_type: str, image_size: int, *args: Any, **kwargs: Any) -> ImageProcessor:
        seen.update(vision_model_type=vision_model_type, image_size=image_size)
        return original(cls, vision_model_type, image_size, *args, **kwargs)

    ImageProcessor.for_encoder = classmethod(spy)  # type: ignore[method-assign,assignment]
    out = train(load_config(None, overrides))
    return {"nemo": str(out) if out else None, **seen}


def test_stage1_with_a_siglip_encoder(tmp_path: Path) -> None:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    data = synthetic.make_dataset(tmp_path / "data", train=4, heldout=1, size=30)
    tok = train_sentencepiece(synthetic.corpus(), tmp_path / "tok.model", vocab_size=300)
    llm = tmp_path / "llm.nemo"
    convert_hf_to_nemo(str(build_tiny_llm("llama", tmp_path / "llm_hf", sp_model=tok)), llm)
    torch.manual_seed(0)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                image_size=30, patch_size=7)  # fmt: skip  # 4 x 4 patches covering 28 px
    SiglipVisionModel(vision).save_pretrained(str(tmp_path / "siglip"))
    job = [
        "name=siglip", f"exp_manager.exp_dir={tmp_path / 'runs'}", f"model.mm_cfg.llm.from_pretrained={llm}",
        f"model.mm_cfg.vision_encoder.from_pretrained={tmp_path / 'siglip'}",
        f"model.data.data_path={data['pretrain']}", f"model.data.image_folder={data['images']}",
        "model.mm_cfg.llm.model_type=plain", "model.data.num_workers=0", "model.data.max_seq_length=64",
        "trainer.enable_progress_bar=false", "model.micro_batch_size=2", "model.global_batch_size=2",
        "trainer.max_steps=2", "model.optim.lr=1e-3", "exp_manager.checkpoint_every_n_steps=0",
    ]  # fmt: skip
    out = run_distributed(train_job, 1, job, timeout=600)[0]
    assert (out["vision_model_type"], out["image_size"]) == ("siglip", 30)
    run = tmp_path / "runs" / "siglip"
    assert out["nemo"] == str(run / "siglip.nemo")
    losses = [float(r.split(",")[1]) for r in (run / "logs" / "loss.csv").read_text().splitlines()[1:]]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)
    with NemoArchive(out["nemo"]) as archive:
        state, cfg = archive.load_legacy(), archive.read_config()
    assert state[NEMO_PREFIX + "0.weight"].shape == (64, 32)  # LLM hidden x SigLIP hidden
    assert cfg["vision"]["image_size"] == 30 and cfg["vision"]["patch_size"] == 7
