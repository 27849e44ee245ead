#!/usr/bin/env python3
"""Training-step throughput of our NeVA (megatron-core ``LLaVAModel``) vs HF ``LlavaForConditionalGeneration``.

Method. Both models are built in this one process with the same dimensions and trained on the same batch, fp32,
on the CPU, every part trainable (LLM, vision encoder, projector; nothing frozen on either side):

- LLM: LLaMA-style, 4 layers, hidden 256, SwiGLU FFN 688, 8 heads, 4 KV groups (GQA), vocab 1024, RoPE,
  RMSNorm, no biases, untied output layer;
- vision: CLIP ViT, 2 layers, hidden 128, FFN 512 (QuickGELU), 4 heads, 112 px images, 14 px patches (64 patches),
  features of layer -2 without the class token; projector ``mlp2x_gelu`` (Linear → GELU → Linear, biased).

Ours is built with ``neva_tools.model.neva.build_neva_model`` (the vision config from
``neva_tools.mappings.clip.transformer_config(arch, select_layer=-2)``, which builds only the layer that is used),
in a single-process megatron parallel state (``init_distributed(tp=1)``, CPU patches applied). The loss is the
model's per-token cross-entropy masked with its ``(loss, mask)`` output, as in training (``llava_loss``). HF is
built from ``LlavaConfig(CLIPVisionConfig, LlamaConfig, vision_feature_layer=-2,
vision_feature_select_strategy="default")`` with the attention implementation of ``--hf-attn`` (default ``sdpa``);
its loss is its own (``labels`` given, shifted inside), called with ``use_cache=False``.

Batch: 4 samples of 256 text tokens, an image placeholder at position 1 of each. Ours gets the placeholder id
(-200) once per sample and expands it to 64 image embeddings; HF gets the expanded ids directly (64 copies of its
image token), so both language models run the same 4 × 319 sequence, with no padding and the same 253
supervised next-token targets per sample (megatron-core does not train the last image embedding to predict the
first text token after it, so that HF label is ignored too). Throughput counts batch × expanded length tokens per step.

A step is ``zero_grad`` + forward + loss + backward + the optimizer step, without gradient clipping on either side
(as before this benchmark trained ours through megatron-core, so its figures compare with earlier ones). Ours trains
as ``neva train`` does (``--engine megatron``, the default): megatron-core's DDP wrapper and optimizer
(``neva_tools.train.megatron_optim``, ``fused_adam``); ``--engine torch`` trains the bare model with
``neva_tools.train.optim.build_optimizer`` (torch's AdamW), HF's optimizer in both cases. ``--precision bf16``: ours
in bf16 weights with fp32 master weights (``Float16Module``), HF in fp32 weights under CPU bf16 autocast (the HF
Trainer's ``bf16=True``); the losses then differ from fp32 in the third decimal.
Each model runs ``--warmup`` untimed steps, then ``--steps`` timed ones; by default the timed steps alternate
(one of ours, one of HF, ...) so that a change in machine load during the run hits both alike
(``--order sequential``: all of ours, then all of HF). Seconds/step is the mean (the median and minimum are
reported too); tokens/s and the ratio ours/HF come from the means, and a second ratio from the fastest steps
(less sensitive to other processes on the machine; the 1-minute load average before and after is reported so
a contended run can be recognized). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

BATCH, TEXT_LEN, IMAGE_POS = 4, 256, 1
LLM = {
    "num_layers": 4, "hidden_size": 256, "ffn_hidden_size": 688, "num_attention_heads": 8, "num_query_groups": 4,
    "encoder_seq_length": 512, "max_position_embeddings": 512, "position_embedding_type": "rope",
    "rotary_base": 10000, "normalization": "rmsnorm", "layernorm_epsilon": 1e-5, "activation": "fast-swiglu",
    "bias": False, "share_embeddings_and_output_weights": False, "hidden_dropout": 0.0, "attention_dropout": 0.0,
}  # fmt: skip
VOCAB = 1024
VISION = {"image_size": 112, "patch_size": 14, "hidden_size": 128, "num_layers": 2, "num_heads": 4,
          "ffn_hidden_size": 512}  # fmt: skip
SELECT_LAYER = -2
IGNORE = -100


def make_batch(image_tokens: int, *, batch: int = BATCH, text_len: int = TEXT_LEN,
               image_size: int = VISION["image_size"], vocab: int = VOCAB) -> dict[str, Any]:  # fmt: skip
    """The same random batch in both layouts: ours (one -200 per sample) and HF's (expanded image tokens, id
    ``vocab - 1``)."""
    import torch

    from neva_tools.data.templates import IMAGE_TOKEN_INDEX

    hf_image_token = vocab - 1  # never drawn as a text token
    g = torch.Generator().manual_seed(0)
    text = torch.randint(3, hf_image_token, (batch, text_len), generator=g)
    text[:, IMAGE_POS] = IMAGE_TOKEN_INDEX
    images = torch.randn(batch, 3, image_size, image_size, generator=g)

    # Ours: labels[i] is the target of position i (the next text token); the placeholder's label is the target of
    # the last image embedding; nothing to predict after the last token nor for the image itself.
    labels = torch.full_like(text, IGNORE)
    labels[:, :-1] = text[:, 1:]
    labels[:, IMAGE_POS - 1] = IGNORE
    ours = {"images": images, "input_ids": text, "labels": labels, "loss_mask": (labels != IGNORE).float(),
            "position_ids": torch.arange(text_len).expand(batch, text_len)}  # fmt: skip

    # HF: the expanded sequence; labels are the inputs themselves (the model shifts them), image positions ignored,
    # and so is the first text token after the image: megatron-core loss-masks the last image embedding.
    image_ids = torch.full((batch, image_tokens), hf_image_token)
    ids = torch.cat([text[:, :IMAGE_POS], image_ids, text[:, IMAGE_POS + 1 :]], dim=1)
    hf_labels = ids.masked_fill(ids == hf_image_token, IGNORE)
    hf_labels[:, IMAGE_POS + image_tokens] = IGNORE
    hf = {"input_ids": ids, "pixel_values": images, "labels": hf_labels}
    return {"ours": ours, "hf": hf, "seq_len": ids.shape[1], "supervised": int((hf_labels[:, 1:] != IGNORE).sum())}


def build_ours(llm: dict[str, Any] = LLM, vocab: int = VOCAB, vision: dict[str, int] = VISION) -> Any:
    """Our NeVA of these dimensions, every part trainable."""
    from neva_tools.mappings.clip import ClipVisionArch, transformer_config
    from neva_tools.model.neva import NevaParts, build_neva_model, freeze

    arch = ClipVisionArch(**vision, activation="quick_gelu")
    parts = NevaParts(llm, vocab, transformer_config(arch, 1, select_layer=SELECT_LAYER), arch.image_size,
                      arch.patch_size, "mlp2x_gelu")  # fmt: skip
    model = build_neva_model(parts)
    freeze(model, llm=False, vision=False)
    return model


def build_hf(attn: str, llm: dict[str, Any] = LLM, vocab: int = VOCAB, vision: dict[str, int] = VISION) -> Any:
    """transformers' ``LlavaForConditionalGeneration`` of the same dimensions (fp32, training mode)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision_config = CLIPVisionConfig(
        hidden_size=vision["hidden_size"], intermediate_size=vision["ffn_hidden_size"],
        num_hidden_layers=vision["num_layers"], num_attention_heads=vision["num_heads"],
        image_size=vision["image_size"], patch_size=vision["patch_size"], hidden_act="quick_gelu",
        layer_norm_eps=1e-5, attention_dropout=0.0,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=vocab, hidden_size=llm["hidden_size"], intermediate_size=llm["ffn_hidden_size"],
        num_hidden_layers=llm["num_layers"], num_attention_heads=llm["num_attention_heads"],
        num_key_value_heads=llm["num_query_groups"], max_position_embeddings=llm["max_position_embeddings"],
        rms_norm_eps=1e-5, hidden_act="silu", attention_bias=False, mlp_bias=False, attention_dropout=0.0,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": float(llm["rotary_base"])},
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision_config, text_config=text, image_token_index=vocab - 1, projector_hidden_act="gelu",
        vision_feature_layer=SELECT_LAYER, vision_feature_select_strategy="default", multimodal_projector_bias=True,
        image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(1234)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn, dtype=torch.float32)
    model.train()
    return model


def ours_loss(model: Any, b: dict[str, Any]) -> Any:
    from neva_tools.train.module import llava_loss

    return llava_loss(model, b)[0]


def hf_loss(model: Any, b: dict[str, Any]) -> Any:
    return model(**b, use_cache=False).loss


class Trainer:
    """One model, torch's AdamW and its batch; ``step()`` runs one full training step and returns its seconds.

    ``autocast``: the forward pass under bf16 autocast (fp32 weights and optimizer: HF Trainer's ``bf16=True``).
    """

    def __init__(self, model: Any, loss_fn: Callable[[Any, dict[str, Any]], Any], batch: dict[str, Any],
                 autocast: bool = False) -> None:  # fmt: skip
        from neva_tools.train.optim import OptimSettings, build_optimizer

        self.model, self.loss_fn, self.batch, self.autocast = model, loss_fn, batch, autocast
        self.optimizer = build_optimizer(model, OptimSettings(lr=1e-4))
        self.times: list[float] = []
        self.losses: list[float] = []

    def step(self) -> float:
        import torch

        start = time.perf_counter()
        self.optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.loss_fn(self.model, self.batch)
        loss.backward()
        self.optimizer.step()
        self.losses.append(loss.item())
        return time.perf_counter() - start


class MegatronTrainer(Trainer):
    """Our model as ``neva train`` trains it: megatron-core DDP (``Float16Module`` for bf16) and megatron-core's
    optimizer (``fused_adam``: fp32 master weights for bf16; no clipping, as on the HF side)."""

    def __init__(self, model: Any, loss_fn: Callable[[Any, dict[str, Any]], Any], batch: dict[str, Any],
                 precision: str) -> None:  # fmt: skip
        from neva_tools.train import megatron_optim as mo
        from neva_tools.train.optim import OptimSettings

        self.chunks = mo.wrap_model(model, precision=precision)
        self.model, self.loss_fn, self.batch, self.autocast = self.chunks[0], loss_fn, batch, False
        self.optimizer = mo.build_optimizer(self.chunks, OptimSettings(lr=1e-4), clip_grad=0.0)
        self.times, self.losses = [], []

    def step(self) -> float:
        from neva_tools.train import megatron_optim as mo

        start = time.perf_counter()
        mo.zero_grad(self.chunks, self.optimizer)
        loss = self.loss_fn(self.model, self.batch)
        mo.scale_loss(self.optimizer, loss).backward()
        mo.optimizer_step(self.chunks, self.optimizer)
        self.losses.append(loss.item())
        return time.perf_counter() - start


def run(trainers: list[Trainer], warmup: int, steps: int, order: str) -> None:
    """``warmup`` untimed steps of each model, then ``steps`` timed ones, interleaved step by step or in turn."""
    for trainer in trainers:
        for _ in range(warmup):
            trainer.step()
    if order == "alternate":
        for _ in range(steps):
            for trainer in trainers:
                trainer.times.append(trainer.step())
    else:
        for trainer in trainers:
            trainer.times.extend(trainer.step() for _ in range(steps))


def summarize(trainer: Trainer, tokens: int) -> dict[str, Any]:
    mean = statistics.fmean(trainer.times)
    return {
        "seconds_per_step": round(mean, 4),
        "median_seconds_per_step": round(statistics.median(trainer.times), 4),
        "min_seconds_per_step": round(min(trainer.times), 4),
        "tokens_per_second": round(tokens / mean, 1),
        "first_loss": round(trainer.losses[0], 4),
        "last_loss": round(trainer.losses[-1], 4),
    }


def count(model: Any, skip: tuple[str, ...] = ()) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(skip))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model first (default 3)")
    parser.add_argument("--hf-attn", choices=("sdpa", "eager"), default="sdpa",
                        help="HF attention implementation (default sdpa)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads for both models (default: torch's choice)")  # fmt: skip
    parser.add_argument("--order", choices=("alternate", "sequential"), default="alternate",
                        help="timed steps interleaved ours/HF (default) or all of ours, then all of HF")  # fmt: skip
    parser.add_argument("--precision", choices=("32", "bf16"), default="32",
                        help="32 (default): fp32 on both sides; bf16: ours bf16 weights + fp32 master weights, "
                             "HF fp32 weights under bf16 autocast")  # fmt: skip
    parser.add_argument("--engine", choices=("megatron", "torch"), default="megatron",
                        help="ours through megatron-core DDP + optimizer as neva train runs it (default), or the "
                             "bare model with torch AdamW (fp32 only)")  # fmt: skip
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch
    import transformers

    from neva_tools.model.parallel import destroy_distributed, init_distributed

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    init_distributed(tp=1, seed=1234)
    try:
        ours = build_ours()
        hf = build_hf(args.hf_attn)
        image_tokens = (VISION["image_size"] // VISION["patch_size"]) ** 2
        if ours.img_seq_len != image_tokens:
            raise SystemExit(f"our model expands an image to {ours.img_seq_len} tokens, expected {image_tokens}")
        data = make_batch(image_tokens)
        tokens = BATCH * data["seq_len"]
        if args.engine == "megatron":
            ours_trainer: Trainer = MegatronTrainer(ours, ours_loss, data["ours"], args.precision)
        elif args.precision == "32":
            ours_trainer = Trainer(ours, ours_loss, data["ours"])
        else:
            raise SystemExit("--engine torch trains in fp32 only")
        trainers = [ours_trainer, Trainer(hf, hf_loss, data["hf"], autocast=args.precision == "bf16")]
        run(trainers, args.warmup, args.steps, args.order)
        ours_result, hf_result = (summarize(t, tokens) for t in trainers)
        last_vision = f"model.vision_tower.encoder.layers.{VISION['num_layers'] - 1}."
        unused = (last_vision, "model.vision_tower.post_layernorm.")
        result = {
            "benchmark": "train_step_tokens_per_second",
            "device": "cpu",
            "precision": args.precision,
            "engine": args.engine,
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "hf_attn_implementation": hf.config._attn_implementation,
            "trained_parts": "all (LLM, vision encoder, projector) on both sides",
            "batch": BATCH,
            "text_tokens_per_sample": TEXT_LEN,
            "image_tokens_per_sample": image_tokens,
            "expanded_seq_len": data["seq_len"],
            "tokens_per_step": tokens,
            "supervised_tokens_per_step": data["supervised"],
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "order": args.order,
            "ours": {**ours_result, "params": count(ours)},
            "hf": {**hf_result, "params": count(hf), "params_used": count(hf, unused)},
            "ratio_ours_over_hf": round(ours_result["tokens_per_second"] / hf_result["tokens_per_second"], 3),
            "ratio_ours_over_hf_by_min_step": round(
                hf_result["min_seconds_per_step"] / ours_result["min_seconds_per_step"], 3
            ),
            "load_average_1min": {
                "start": round(load_before, 2),
                "end": round(os.getloadavg()[0], 2),
                "cpus": os.cpu_count(),
            },
            "target_ratio": ">= 1.0",
            "notes": (
                "HF builds and runs all vision layers (plus post_layernorm on the class token) and takes "
                "hidden_states[-2]; ours builds only the layers up to select_layer -2. params_used excludes "
                "HF's last vision layer and post_layernorm."
            ),
        }
    finally:
        destroy_distributed()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
