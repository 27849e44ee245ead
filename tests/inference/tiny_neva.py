"""A tiny trained NeVA for the inference tests: synthetic shapes data, a 320-piece tokenizer, a 2-layer LLaMA
converted to ``.nemo``, a 3-layer Hugging Face CLIP (28 px, 7 px patches), and a short ``neva train`` stage 2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

LLM_CONFIG = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)  # fmt: skip


def build_assets(root: Path, *, max_position_embeddings: int = 512, train: int = 24) -> dict[str, Any]:
    """Data (``train`` image-caption/question records), tokenizer, LLM ``.nemo`` and CLIP directory under ``root``."""
    import transformers
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from neva_tools.convert.hf_to_nemo import convert_hf_to_nemo
    from neva_tools.data import synthetic
    from neva_tools.tokenizer.train import train_sentencepiece

    data = synthetic.make_dataset(root / "data", train=train, heldout=2, size=28)
    tok = train_sentencepiece(synthetic.corpus(), root / "tok.model", vocab_size=320)
    config = transformers.LlamaConfig(**{**LLM_CONFIG, "max_position_embeddings": max_position_embeddings})
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(str(root / "llm_hf"))
    (root / "llm_hf" / "tokenizer.model").write_bytes(tok.read_bytes())
    convert_hf_to_nemo(str(root / "llm_hf"), root / "llm.nemo")
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=28, patch_size=7)  # fmt: skip
    CLIPVisionModel(vision).save_pretrained(str(root / "clip"))
    return {"root": root, "data": data, "llm": root / "llm.nemo", "clip": root / "clip", "tokenizer": tok}


def train_overrides(assets: dict[str, Any], name: str, steps: int) -> list[str]:
    """``neva train`` overrides: stage 2 (LLM and projector trained) on the finetune split, vicuna_v1."""
    return [f"name={name}", f"exp_manager.exp_dir={assets['root'] / 'runs'}",
            f"model.mm_cfg.llm.from_pretrained={assets['llm']}",
            f"model.mm_cfg.vision_encoder.from_pretrained={assets['clip']}",
            f"model.data.image_folder={assets['data']['images']}", f"model.data.data_path={assets['data']['finetune']}",
            "model.data.num_workers=0", "model.data.max_seq_length=256", "trainer.enable_progress_bar=false",
            "model.micro_batch_size=8", "model.global_batch_size=8", "model.mm_cfg.llm.model_type=vicuna_v1",
            "model.mm_cfg.llm.freeze=false", f"trainer.max_steps={steps}", "model.optim.lr=3e-3",
            "model.optim.sched.min_lr=1e-4", "exp_manager.checkpoint_every_n_steps=0"]  # fmt: skip


def train_job(rank: int, world_size: int, overrides: list[str]) -> str | None:
    """Run ``neva train`` in this process (for ``run_distributed``); the final ``.nemo`` on rank 0."""
    from neva_tools.config.load import load_config
    from neva_tools.train.run import train

    out = train(load_config(None, overrides))
    return str(out) if out else None
