"""Tiny models for the plan tests, built the way training builds them, and their planned counterparts."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
import neva_tiny as nt

from neva_tools.mappings.clip import ClipVisionArch
from neva_tools.plan.model import PlannedModel
from neva_tools.plan.shapes import LlmShape, VisionShape

VOCAB = nt.VOCAB
#: The tiny NeVA's tower (``neva_tiny.vision_config``) as an architecture: both its layers built (select_layer -1).
TINY_VISION = ClipVisionArch(image_size=nt.IMAGE, patch_size=nt.PATCH, hidden_size=32, num_layers=2, num_heads=4,
                             ffn_hidden_size=64, activation="gelu")  # fmt: skip
#: A GPT with every kind of tensor the plan lists: LayerNorm, biases, GELU (not gated) and tied embeddings.
BIASED_GPT = {**nt.TINY_GPT, "normalization": "layernorm", "activation": "gelu", "bias": True,
              "share_embeddings_and_output_weights": True}  # fmt: skip


def planned_gpt(cfg: dict[str, Any]) -> PlannedModel:
    return PlannedModel(LlmShape.from_nemo_config(cfg, VOCAB, "test"))


def planned_neva(freeze_llm: bool, freeze_vision: bool = True) -> PlannedModel:
    return PlannedModel(LlmShape.from_nemo_config(nt.LLM, VOCAB, "test"), VisionShape(TINY_VISION, -1),
                        freeze_llm=freeze_llm, freeze_vision=freeze_vision)  # fmt: skip


def build_gpt(cfg: dict[str, Any], *, tp: int, pp: int, pp_rank: int) -> Any:
    from neva_tools.model.gpt import build_gpt_model

    return build_gpt_model(
        {**cfg, "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp},
        padded_vocab_size=VOCAB,
        pre_process=pp_rank == 0,
        post_process=pp_rank == pp - 1,
    )


def build_neva(tp: int, freeze_llm: bool, freeze_vision: bool = True) -> Any:
    return nt.build(tp, freeze_llm=freeze_llm, freeze_vision=freeze_vision)
