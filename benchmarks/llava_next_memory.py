#!/usr/bin/env python3
"""Per-GPU training memory of the LLaVA-NeXT recipes (``recipes/llava_next_qwen2.5_*``), by ``benchmarks/memory.py``'s
formula, extended to AnyRes: an image is several tiles through the vision tower, one sample per micro batch.

The accounting is :func:`memory.predict_memory`'s (bf16 weights + fp32 gradients + fp32 master weights and Adam
moments, the latter two sharded over data-parallel ranks with ``distributed_fused_adam``; Korthikanti et al.'s
activations with flash/SDPA attention, no sequence parallelism; logits at every position, an upper bound; full
recompute keeps each layer's input and recomputes one layer in backward), with two changes:

- the vision tower is SigLIP-so400m-patch14-384 (26 of its 27 layers built: ``vision_select_layer -2``; 729
  patches, no class token), trainable in stages 1.5 and 2, and sees ``tiles`` images per sample: the base view plus
  the grid. The worst case is the largest grid of the pinpoints: 2 × 2 + 1 = 5 tiles in stage 1.5 (the seed's five
  canvases up to 768 px), 6 × 6 + 1 = 37 in stage 2 (``(1x1),...,(6x6)``; ``anyres_max_9`` shrinks the features after
  the projector, not the tiles the tower sees);
- the LLM sequence is the recipe's ``max_seq_length`` (the seed's ``model_max_length``: 8192, 32768), the most a
  padded micro batch can hold, and a typical long sample: stage 1 ~1024 tokens (729 image tokens + a LCS-558K
  caption), stage 1.5 4096 (the largest image is 3699 tokens), stage 2 9216 (the largest image is 8829 tokens,
  ``ImageLayout.max_tokens``).

Each row: the recipe's TP and the DP of 8 GPUs, micro batch, tokens, tiles, optimizer, recompute, GiB per GPU of
weights+gradients+optimizer state (``states_gib``), peak activations (``activations_gib``) and their sum, and
``fits_80GB`` (within 80 GiB minus memory.py's 8 GiB of headroom). Prints one JSON object; runs in a second.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import (  # benchmarks/ is not a package
    CARD_BYTES,
    HEADROOM_BYTES,
    GiB,
    LlmShape,
    ProjectorShape,
    VitShape,
    layer_activation_bytes,
    padded_vocab,
)


@dataclass(frozen=True)
class SiglipShape(VitShape):
    """A SigLIP ViT: no class token (the sequence is the patches)."""

    @property
    def tokens(self) -> int:
        return self.patches


SIGLIP_SO400M_384 = SiglipShape(layers=26, hidden=1152, ffn=4304, heads=16, image=384, patch=14)
QWEN = {  # Qwen2.5 Instruct; the formula counts an untied output layer (0.5B ties it: 136M parameters fewer)
    "qwen2.5-0.5b": LlmShape(layers=24, hidden=896, ffn=4864, heads=14, kv_heads=2, vocab=151936),
    "qwen2.5-7b": LlmShape(layers=28, hidden=3584, ffn=18944, heads=28, kv_heads=4, vocab=152064),
}
#: stage → (micro batch, tiles per sample, LLM trained, tower trained, sequence lengths)
STAGES = {
    "stage1": (8, 1, False, False, (1024, 8192)),
    "stage1.5": (1, 5, True, True, (4096, 32768)),
    "stage2": (1, 37, True, True, (9216, 32768)),
}
RECIPE_TP = {"qwen2.5-0.5b": (1, 2), "qwen2.5-7b": (4, 2)}  # the recipes' TP, then the alternative


def predict(llm: LlmShape, *, tp: int, dp: int, micro: int, seq: int, tiles: int, train_llm: bool,
            train_vision: bool, optimizer: str, recompute: bool) -> dict[str, Any]:  # fmt: skip
    """Bytes per GPU (see the module docstring)."""
    vit, h = SIGLIP_SO400M_384, llm.hidden

    def block(layers: int, s: int, b: int, hidden: int, heads: int) -> tuple[float, float]:
        layer = layer_activation_bytes(s, b, hidden, heads, tp, flash=True, sequence_parallel=False)
        return (layers * 2 * s * b * hidden, layer) if recompute else (layers * layer, 0.0)

    llm_saved, llm_working = block(llm.layers, seq, micro, h, llm.heads)
    head = 4 * seq * micro * h + 4 * seq * micro * padded_vocab(llm.vocab, tp) / tp
    images = micro * tiles
    projector = images * vit.patches * (2 * vit.hidden + 4 * h / tp)
    vit_saved, vit_working = 0.0, 0.0
    if train_vision:
        vit_saved, vit_working = block(vit.layers, vit.tokens, images, vit.hidden, vit.heads)
        vit_saved += images * 2 * 3 * vit.image**2  # the tiles, input of the patch convolution
    activations = llm_saved + head + projector + vit_saved + max(llm_working, vit_working)
    p_vit, p_llm, p_proj = vit.params(tp), llm.params(tp), ProjectorShape(vit.hidden, h).params(tp)
    trainable = p_proj + (p_llm if train_llm else 0) + (p_vit if train_vision else 0)
    shards = dp if optimizer == "distributed_fused_adam" else 1
    states = 2 * (p_vit + p_llm + p_proj) + 4 * trainable + 12 * trainable / shards
    total = states + activations
    return {"states_gib": round(states / GiB, 1), "activations_gib": round(activations / GiB, 1),
            "total_gib": round(total / GiB, 1), "fits_80GB": total <= CARD_BYTES - HEADROOM_BYTES}  # fmt: skip


def main() -> int:
    rows = []
    for name, llm in QWEN.items():
        for stage, (micro, tiles, train_llm, train_vision, seqs) in STAGES.items():
            for tp in RECIPE_TP[name]:
                for seq in seqs:
                    for optimizer in ("fused_adam", "distributed_fused_adam"):
                        for recompute in (False, True):
                            r = predict(llm, tp=tp, dp=8 // tp, micro=micro, seq=seq, tiles=tiles,
                                        train_llm=train_llm, train_vision=train_vision, optimizer=optimizer,
                                        recompute=recompute)  # fmt: skip
                            rows.append({"llm": name, "stage": stage, "tp": tp, "dp": 8 // tp, "micro_batch": micro,
                                         "seq": seq, "tiles": tiles, "optimizer": optimizer,
                                         "recompute": "full" if recompute else "none", **r})  # fmt: skip
    print(json.dumps({"unit": "GiB per GPU", "vision": "SigLIP-so400m-patch14-384, layer -2", "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
