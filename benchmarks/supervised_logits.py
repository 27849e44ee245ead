#!/usr/bin/env python3
"""What computing logits only at labelled positions saves, on LLaVA-1.5-shaped samples, in one run.

Two copies of one small NeVA (same seed, same weights) train side by side on the same batch, fp32 on the CPU,
every part trainable: ``selected`` as ``neva train`` builds it (``neva_tools.model.supervised_logits``: the output
layer and cross-entropy see only positions with a label) and ``full`` built with ``supervised_logits=False``
(megatron-core's path: logits of every position, loss masked afterwards).

- Model: ``benchmarks/train.py``'s LLM (LLaMA-style, 4 layers, hidden 256, GQA) with LLaMA-2's 32,000-token
  vocabulary, and a 2-layer CLIP ViT at 336 px / 14 px patches: 576 image tokens per image, as LLaVA-1.5.
- Samples (default: stage-1 pretraining, BLIP-558K captions): one image, ``--text`` text tokens of which the first
  ``--prompt`` carry no loss (the prompt / template) and the rest are the supervised caption. ``--text 300
  --prompt 150`` looks like stage-2 finetuning instead.

A step is ``zero_grad`` + forward + loss + backward + ``AdamW.step``; steps alternate between the two models after
``--warmup`` untimed ones. Also reported: the activation memory autograd keeps for backward (bytes of the distinct
tensors saved in one forward, found with ``torch.autograd.graph.saved_tensors_hooks``) and the logits' own size.
The two losses must agree (checked; ``max_loss_difference``). Prints one JSON object.

The time ratio is large here because the LLM is tiny next to its 32,000-column output layer; in a 7B model the
output layer is a few percent of the compute. The memory figure carries over: the logits and their softmax are
``positions × vocabulary`` floats whatever the model, and here they shrink to the labelled positions.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

VOCAB = 32000
VISION = {"image_size": 336, "patch_size": 14, "hidden_size": 128, "num_layers": 2, "num_heads": 4,
          "ffn_hidden_size": 512}  # fmt: skip


def build(supervised_logits: bool) -> Any:
    import torch
    from train import LLM

    from neva_tools.mappings.clip import ClipVisionArch, transformer_config
    from neva_tools.model.neva import NevaParts, build_neva_model, freeze

    arch = ClipVisionArch(**VISION, activation="quick_gelu")
    llm = {**LLM, "encoder_seq_length": 1024, "max_position_embeddings": 1024}
    parts = NevaParts(llm, VOCAB, transformer_config(arch, 1, select_layer=-2), arch.image_size, arch.patch_size,
                      "mlp2x_gelu")  # fmt: skip
    torch.manual_seed(1234)
    model = build_neva_model(parts, supervised_logits=supervised_logits)
    freeze(model, llm=False, vision=False)
    return model


def make_batch(batch: int, text: int, prompt: int) -> dict[str, Any]:
    """``batch`` samples: the image placeholder at position 1, ``text`` tokens, labels on all but the prompt."""
    import torch

    from neva_tools.data.templates import IGNORE_INDEX, IMAGE_TOKEN_INDEX

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (batch, text), generator=g)
    ids[:, 1] = IMAGE_TOKEN_INDEX
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, prompt:-1] = ids[:, prompt + 1 :]
    size = VISION["image_size"]
    images = torch.randn(batch, 3, size, size, generator=g)
    return {"images": images, "input_ids": ids, "labels": labels, "loss_mask": (labels != IGNORE_INDEX).float(),
            "position_ids": torch.arange(text).expand(batch, text)}  # fmt: skip


def saved_bytes(model: Any, batch: dict[str, Any]) -> int:
    """Bytes of the distinct tensors autograd saves for backward in one forward (parameters excluded)."""
    import torch

    from neva_tools.train.module import llava_loss

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = llava_loss(model, batch)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4, help="samples per step (default 4)")
    parser.add_argument("--text", type=int, default=48, help="text tokens per sample (default 48)")
    parser.add_argument("--prompt", type=int, default=8, help="leading text tokens without loss (default 8)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per model (default 8)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first (default 2)")
    args = parser.parse_args()
    if not 2 <= args.prompt < args.text - 1 or args.steps < 1 or args.warmup < 0 or args.batch < 1:
        parser.error("need 2 <= --prompt < --text - 1, --steps >= 1, --warmup >= 0, --batch >= 1")

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import torch

    from neva_tools.model.parallel import destroy_distributed, init_distributed
    from neva_tools.train.module import llava_loss
    from neva_tools.train.optim import OptimSettings, build_optimizer

    init_distributed(tp=1, seed=1234)
    try:
        models = {"selected": build(True), "full": build(False)}
        batch = make_batch(args.batch, args.text, args.prompt)
        image_tokens = models["full"].img_seq_len
        positions = args.batch * (args.text - 1 + image_tokens)
        labelled = int((batch["labels"] != -100).sum())
        memory = {name: saved_bytes(model, batch) for name, model in models.items()}
        optimizers = {name: build_optimizer(model, OptimSettings(lr=1e-4)) for name, model in models.items()}
        times: dict[str, list[float]] = {name: [] for name in models}
        losses: dict[str, list[float]] = {name: [] for name in models}
        for step in range(args.warmup + args.steps):
            for name, model in models.items():
                start = time.perf_counter()
                optimizers[name].zero_grad()
                loss, _ = llava_loss(model, batch)
                loss.backward()
                optimizers[name].step()
                if step >= args.warmup:
                    times[name].append(time.perf_counter() - start)
                losses[name].append(loss.item())
        difference = max(abs(a - b) for a, b in zip(losses["selected"], losses["full"], strict=True))
        if difference > 1e-4:
            raise SystemExit(f"the two models' losses differ by {difference}: the comparison is void")
        mean = {name: statistics.fmean(t) for name, t in times.items()}
        result = {
            "benchmark": "supervised_logits_only",
            "device": "cpu",
            "dtype": "float32",
            "torch_threads": torch.get_num_threads(),
            "vocab": VOCAB,
            "batch": args.batch,
            "image_tokens_per_sample": image_tokens,
            "text_tokens_per_sample": args.text,
            "positions_per_step": positions,
            "labelled_positions_per_step": labelled,
            "timed_steps": args.steps,
            "seconds_per_step": {name: round(m, 4) for name, m in mean.items()},
            "speedup_selected_over_full": round(mean["full"] / mean["selected"], 3),
            "saved_activation_mib": {name: round(b / 2**20, 1) for name, b in memory.items()},
            "activation_memory_ratio_selected_over_full": round(memory["selected"] / memory["full"], 3),
            "logits_mib": {
                "selected": round(labelled * VOCAB * 4 / 2**20, 1),
                "full": round(positions * VOCAB * 4 / 2**20, 1),
            },
            "max_loss_difference": difference,
        }
    finally:
        destroy_distributed()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
