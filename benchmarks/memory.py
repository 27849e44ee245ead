#!/usr/bin/env python3
"""Training memory per rank of our NeVA (megatron-core ``LLaVAModel``): measured on a small model, next to a formula.

Method. A small NeVA is built in bf16 with fp32 master weights (``neva_tools.train.megatron_optim``: ``wrap_model``
with ``precision="bf16"``, then ``build_optimizer``), in two gloo processes on the CPU (DP = 2, TP = 1; spawned with
``torch.multiprocessing``), stage-2 style: LLM and projector trainable, vision encoder frozen (``--train-vision``
trains it too). Dimensions, built as ``benchmarks/train.py`` builds its model (``build_neva_model``, the vision config
from ``neva_tools.mappings.clip.transformer_config(arch, select_layer=-2)``; the batch is its ``make_batch``):

- LLM: LLaMA-style, 4 layers, hidden 256, SwiGLU FFN 688 (LLaMA-2's 11008/4096 ratio), 8 heads (MHA, as
  LLaMA-2-7B/13B), vocab 1024, RoPE, RMSNorm, no biases, untied output layer, no dropout;
- vision: CLIP ViT, 3 layers (2 built: features of layer -2), hidden 128, FFN 512, 4 heads, 112 px, 14 px patches
  (64 image tokens); projector ``mlp2x_gelu``;
- micro-batch of 2 samples of 193 text tokens with one image each: LLM sequence 256; 191 labelled tokens per sample.

Four configurations are measured: {``fused_adam`` (megatron's plain optimizer), ``distributed_fused_adam``
(megatron's distributed optimizer)} × {no recompute, full recompute (``uniform``, 1 layer)}; recompute is set by the
NeMo keys ``activations_checkpoint_granularity/method/num_layers`` in the LLM config dict and, for the vision encoder,
by ``neva_tools.model.recompute.apply_recompute`` on its config. In each, one training step runs (forward, backward,
``optimizer_step``: Adam creates its state), then on each rank:

- parameters: the bytes of the unique storages of the model's parameters (bf16; with the distributed optimizer the
  parameters are views of megatron DDP's contiguous parameter buffer, padding included);
- gradients: the bytes of megatron DDP's fp32 gradient buffers (``grad_data`` of each of its buffers);
- optimizer: ``optimizer_state_bytes`` (fp32 master copies of the bf16 parameters + Adam's moments and step counters;
  shards of them with the distributed optimizer);
- activations: the bytes of the unique storages autograd saves for backward during the forward pass (model + loss)
  of the micro-batch, recorded with ``torch.autograd.graph.saved_tensors_hooks`` (parameters excluded), split by part
  (LLM layers, LLM head, projector, vision, rest); per LLM layer call as well; with full recompute also during
  backward, where each recomputed layer saves its working set again (reported as the largest LLM layer call).

Both ranks train on the same batch; the larger of the two ranks' figures is reported (they can differ only in the
distributed optimizer's shard sizes).

Formula (:func:`predict_memory`, per GPU, bytes): parameters 2 B/param (bf16, all parameters of this TP rank);
gradients 4 B per trainable parameter (fp32 grad buffer); optimizer 12 B per trainable parameter (fp32 master weight
+ two fp32 Adam moments), divided by DP with the distributed optimizer; activations from Korthikanti et al. 2022
("Reducing Activation Recomputation in Large Transformer Models", 16-bit, per layer, no sequence parallelism):
``s·b·h·(10 + 24/t + 5·a·s/(h·t))`` (``s·b·h·(34 + 5·a·s/h)/t`` with sequence parallelism), without the ``a·s²``
term with flash/SDPA attention (this project's, on GPU and CPU) or selective recompute; with full recompute the
layer inputs ``2·s·b·h`` per layer are kept, and one layer's working set (the no-recompute figure) is recomputed in
backward (peak). See the docstring of :func:`predict_memory` for every assumption. The measured/predicted ratios are
printed next to the measurements (``predicted`` uses the small model's exact parameter counts and batch).

Reading the result. Parameters, gradients and optimizer state match the formula to the byte (up to Adam's step
counters and megatron's buffer padding, when there is any). Saved activations exceed the standard estimate, for
reasons the per-layer figures (``llm_layer``) expose: on the CPU, ``torch.nn.RMSNorm`` on bf16 inputs runs as
decomposed fp32 ops and keeps two fp32 ``[s, b, h]`` tensors per norm (8·sbh where the estimate has 2; on the GPU
torch has a fused RMSNorm); the SwiGLU MLP keeps its input, gate, up, ``silu(gate)`` and the fc2 input
(2·sbh + 8·sbf with ``f = 2.6875·h``: 23.5·sbh where a 4h GELU MLP has 19); attention keeps Q, K, V, the SDPA
output and its re-laid-out copy (12·sbh where the estimate has 11, with no ``s×s`` term and no dropout masks).

Then the formula alone (no measurement) for LLaVA-1.5 7B and 13B stage 2 (LLM + projector trainable, CLIP
ViT-L/14-336 frozen) on 8 GPUs: TP 4 × DP 2 and TP 8 × DP 1, micro-batch 4 and 1, sequence 2048 and 4096,
{fused_adam, distributed_fused_adam} × {no recompute, selective, full}, with ``fits_80GB``: the predicted peak
(parameters + gradients + optimizer + peak activations) within 80 GiB minus 8 GiB of headroom for the CUDA
context, NCCL buffers, allocator fragmentation and the transient tensors of backward and the optimizer step.

Prints one JSON object. Runs in about 20 seconds on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

GiB = 1 << 30
CARD_BYTES = 80 * GiB  # an "80GB" A100/H100 (torch reports ~79.1 GiB usable on an H100)
HEADROOM_BYTES = 8 * GiB  # CUDA context, NCCL buffers, allocator fragmentation, transient backward/optimizer tensors
OPTIMIZERS = ("fused_adam", "distributed_fused_adam")
RECOMPUTE_KEYS = {
    "none": {},
    "selective": {"activations_checkpoint_granularity": "selective"},
    "full": {"activations_checkpoint_granularity": "full", "activations_checkpoint_method": "uniform",
             "activations_checkpoint_num_layers": 1},
}  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# The formula (plain Python)
# --------------------------------------------------------------------------------------------------------------------


def padded_vocab(vocab: int, tp: int, divisible_by: int = 128) -> int:
    """megatron's padding: a multiple of ``make_vocab_size_divisible_by × TP``."""
    multiple = divisible_by * tp
    return -(-vocab // multiple) * multiple


@dataclass(frozen=True)
class LlmShape:
    """A LLaMA-style LLM: RMSNorm, SwiGLU, RoPE, no biases, untied output layer."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int

    def params(self, tp: int) -> int:
        """Parameters on one TP rank (norms replicated; everything else split over ``tp``)."""
        h, head_dim = self.hidden, self.hidden // self.heads
        v = padded_vocab(self.vocab, tp)
        per_layer = ((h + 2 * self.kv_heads * head_dim) * h + self.heads * head_dim * h + 3 * self.ffn * h) // tp
        return 2 * v * h // tp + self.layers * (per_layer + 2 * h) + h


@dataclass(frozen=True)
class VitShape:
    """A CLIP ViT: ``layers`` is the number of transformer layers built (those up to the selected feature layer)."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    image: int
    patch: int

    @property
    def patches(self) -> int:
        return (self.image // self.patch) ** 2

    @property
    def tokens(self) -> int:
        """Sequence length of one image inside the ViT (patches + class token)."""
        return self.patches + 1

    def params(self, tp: int) -> int:
        """Parameters on one TP rank (linear weights and column biases split; norms, row biases, embeddings not)."""
        h, f = self.hidden, self.ffn
        per_layer = (3 * h * h + 3 * h + h * h + 2 * f * h + f) // tp + 6 * h
        return h + 3 * self.patch**2 * h + self.tokens * h + 2 * h + self.layers * per_layer


@dataclass(frozen=True)
class ProjectorShape:
    """``mlp2x_gelu``: column-parallel Linear(vision → LLM hidden) → GELU → row-parallel Linear(hidden → hidden)."""

    vision_hidden: int
    hidden: int

    def params(self, tp: int) -> int:
        h = self.hidden
        return (h * self.vision_hidden + h + h * h) // tp + h


def layer_activation_bytes(s: int, b: int, h: int, a: int, tp: int, *, flash: bool, sequence_parallel: bool) -> float:
    """Bytes one transformer layer saves for backward without recompute (Korthikanti et al. 2022, 16-bit).

    ``sbh·(34 + 5as/h)`` in all: attention 11sbh (QKV input 2, Q and K 4, V 2, output-projection input 2, dropout
    mask 1) + 5as²b (softmax output 2, its dropout mask 1, dropout output 2), MLP 19sbh (fc1 input 2, GELU input 8,
    fc2 input 8, dropout mask 1), two layer norms 4sbh. Tensor parallelism splits all but the norms' and the two
    linears' inputs and the two dropout masks (10sbh) unless sequence parallelism splits those too. Flash/SDPA
    attention (and selective recompute) keeps no ``s×s`` tensor: the ``5as/h`` term is dropped.
    """
    attention = 0.0 if flash else 5 * a * s / h
    if sequence_parallel:
        return s * b * h * (34 + attention) / tp
    return s * b * h * (10 + (24 + attention) / tp)


def predict_memory(
    llm: LlmShape,
    vision: VitShape,
    projector: ProjectorShape,
    *,
    tp: int,
    dp: int,
    micro_batch: int,
    seq: int,
    optimizer: str,
    recompute: str,
    vision_trainable: bool = False,
    labelled: int | None = None,
    flash: bool = True,
    sequence_parallel: bool = False,
) -> dict[str, Any]:
    """Per-GPU training memory of a NeVA (bytes), by the usual accounting.

    Assumptions:

    - bf16 weights with fp32 master weights (megatron-core ``Float16Module`` + mixed-precision optimizer): every
      parameter of the rank 2 B; trainable ones also a 4 B fp32 gradient (megatron DDP's ``grad_reduce_in_fp32``
      buffer) and 12 B of optimizer state (fp32 master copy + Adam ``exp_avg`` + ``exp_avg_sq``), the latter divided
      by ``dp`` with ``distributed_fused_adam`` (the distributed optimizer shards master weights and moments; the
      gradient buffer stays whole: its reduce-scatter happens in place). Frozen parameters carry neither. Buffer
      padding, Adam's step counters and fp32 norms are ignored.
    - Tensor parallelism splits every linear weight and the (padded) vocabulary over ``tp``; norms, row-parallel
      biases and ViT embeddings are replicated. One image per sample; pipeline parallelism 1.
    - Activations (``activations``: what the forward pass saves; ``activations_peak``: at the start of backward,
      plus with full recompute one layer's recomputed working set): ``layers ×`` :func:`layer_activation_bytes` (the
      Korthikanti estimate, 16-bit, including dropout masks although LLaVA trains without dropout, and counting the
      MLP as a 4h GELU MLP whatever its real width and activation); ``selective`` drops the ``a·s²`` term, which
      flash/SDPA attention (``flash``, the default) drops anyway, so with flash it equals no recompute; ``full``
      (uniform, 1 layer) keeps the layer inputs ``2·s·b·h`` per layer (split by ``tp`` only with sequence
      parallelism). Plus the LLM head: final-norm and output-layer inputs ``4·s·b·h`` and fp32 logits for the cross
      entropy ``4·n·v/t`` (``n = labelled`` tokens, default all ``s·b``; our supervised-logits path computes logits
      only there, NeMo's GPTModel at every position); plus the projector, applied to every image token
      (``b·patches·(2·h_vision + 4·h/t)``: fc1 input, GELU input, fc2 input). A frozen vision encoder saves nothing
      (no input or weight of it needs a gradient); a trainable one is counted as the LLM's layers, with ``s`` =
      patches + class token and ``b`` images, plus its images and ``ln_pre`` input. Embedding lookups (indices only),
      RoPE tables and the loss are ignored.
    """
    if optimizer not in OPTIMIZERS or recompute not in RECOMPUTE_KEYS:
        raise ValueError(f"optimizer {optimizer!r} / recompute {recompute!r}")
    s, b, h = seq, micro_batch, llm.hidden
    n = s * b if labelled is None else labelled
    split = tp if sequence_parallel else 1
    flash_like = flash or recompute == "selective"

    def block(layers: int, s: int, b: int, h: int, a: int) -> tuple[float, float]:
        """(saved in forward, recomputed working set) of ``layers`` layers."""
        layer = layer_activation_bytes(s, b, h, a, tp, flash=flash_like, sequence_parallel=sequence_parallel)
        if recompute == "full":
            return layers * 2 * s * b * h / split, layer
        return layers * layer, 0.0

    llm_saved, llm_working = block(llm.layers, s, b, h, llm.heads)
    head = 4 * s * b * h / split + 4 * n * padded_vocab(llm.vocab, tp) / tp
    proj = b * vision.patches * (2 * projector.vision_hidden + 4 * h / tp)
    vit_saved, vit_working = 0.0, 0.0
    if vision_trainable:  # its layers, plus the inputs of the patch convolution (the images) and of ln_pre
        vit_saved, vit_working = block(vision.layers, vision.tokens, b, vision.hidden, vision.heads)
        vit_saved += b * (2 * 3 * vision.image**2 + 2 * vision.tokens * vision.hidden)
    activations = llm_saved + head + proj + vit_saved
    peak = activations + max(llm_working, vit_working)

    vit_params, llm_params, proj_params = vision.params(tp), llm.params(tp), projector.params(tp)
    params = llm_params + vit_params + proj_params
    trainable = llm_params + proj_params + (vit_params if vision_trainable else 0)
    shards = dp if optimizer == "distributed_fused_adam" else 1
    state = {"params": 2 * params, "grads": 4 * trainable, "optimizer": 12 * trainable / shards}
    return {
        "param_count": params,
        "trainable_param_count": trainable,
        **{k: round(v) for k, v in state.items()},
        "activations": round(activations),
        "activations_peak": round(peak),
        "activations_by_part": {
            "llm_layers": round(llm_saved),
            "llm_head": round(head),
            "projector": round(proj),
            "vision": round(vit_saved),
        },
        "recompute_working_set": round(max(llm_working, vit_working)),
        "total_peak": round(sum(state.values()) + peak),
    }


LLAVA_VISION = VitShape(layers=23, hidden=1024, ffn=4096, heads=16, image=336, patch=14)  # ViT-L/14-336, layer -2
LLAVA_LLMS = {
    "llava-1.5-7b": LlmShape(layers=32, hidden=4096, ffn=11008, heads=32, kv_heads=32, vocab=32000),
    "llava-1.5-13b": LlmShape(layers=40, hidden=5120, ffn=13824, heads=40, kv_heads=40, vocab=32000),
}
LLAVA_LAYOUTS = (  # (tp, dp, seq) on 8 GPUs; TP 4 at 4096 is the 7B recipes' layout, TP 8 at 4096 the 13B one's
    (4, 2, 2048),
    (4, 2, 4096),
    (8, 1, 2048),
    (8, 1, 4096),
)


def llava_predictions() -> dict[str, Any]:
    """The formula for LLaVA-1.5 7B/13B stage 2 on 8 GPUs (GiB per GPU)."""
    rows = []
    budget = CARD_BYTES - HEADROOM_BYTES
    for name, llm in LLAVA_LLMS.items():
        projector = ProjectorShape(LLAVA_VISION.hidden, llm.hidden)
        for tp, dp, seq in LLAVA_LAYOUTS:
            for micro_batch in (4, 1):
                for optimizer in OPTIMIZERS:
                    for recompute in RECOMPUTE_KEYS:
                        p = predict_memory(llm, LLAVA_VISION, projector, tp=tp, dp=dp, micro_batch=micro_batch,
                                           seq=seq, optimizer=optimizer, recompute=recompute)  # fmt: skip
                        parts = ("params", "grads", "optimizer", "activations", "activations_peak", "total_peak")
                        gib = {f"{k}_gib": round(p[k] / GiB, 2) for k in parts}
                        rows.append({"model": name, "tp": tp, "dp": dp, "micro_batch": micro_batch, "seq": seq,
                                     "optimizer": optimizer, "recompute": recompute, **gib,
                                     "fits_80GB": p["total_peak"] <= budget})  # fmt: skip
    return {
        "unit": "GiB per GPU (*_gib); optimizer_gib is the optimizer state, activations_gib what forward saves",
        "stage": "2: LLM + projector trainable, CLIP ViT-L/14-336 frozen (23 of 24 layers built: select_layer -2)",
        "fits_80GB_rule": f"total_peak <= {CARD_BYTES // GiB} GiB - {HEADROOM_BYTES // GiB} GiB headroom "
        "(CUDA context, NCCL buffers, fragmentation, transient backward/optimizer tensors)",
        "assumptions": "bf16 + fp32 master weights, no sequence parallelism (this project does not use it), flash/SDPA "
        "attention (so selective recompute equals none), logits for all s*b tokens (an upper bound), vocab 32000 "
        "padded to 128*TP, one image (576 tokens) per sample within seq; see predict_memory's docstring",
        "llm_params_per_rank": {name: {tp: llm.params(tp) for tp in (4, 8)} for name, llm in LLAVA_LLMS.items()},
        "rows": rows,
    }


# --------------------------------------------------------------------------------------------------------------------
# The measurement (two gloo processes)
# --------------------------------------------------------------------------------------------------------------------

SMALL_LLM = LlmShape(layers=4, hidden=256, ffn=688, heads=8, kv_heads=8, vocab=1024)
SMALL_VISION = VitShape(layers=2, hidden=128, ffn=512, heads=4, image=112, patch=14)  # 3 layers, select_layer -2
SMALL_VISION_LAYERS = 3
MICRO_BATCH, TEXT_LEN = 2, 193  # 192 text tokens + the image placeholder (64 image tokens): LLM sequence 256


def _llm_config(recompute: str) -> dict[str, Any]:
    return {
        "num_layers": SMALL_LLM.layers, "hidden_size": SMALL_LLM.hidden, "ffn_hidden_size": SMALL_LLM.ffn,
        "num_attention_heads": SMALL_LLM.heads, "num_query_groups": SMALL_LLM.kv_heads, "encoder_seq_length": 512,
        "max_position_embeddings": 512, "position_embedding_type": "rope", "rotary_base": 10000,
        "normalization": "rmsnorm", "layernorm_epsilon": 1e-5, "activation": "fast-swiglu", "bias": False,
        "share_embeddings_and_output_weights": False, "hidden_dropout": 0.0, "attention_dropout": 0.0,
        **RECOMPUTE_KEYS[recompute],
    }  # fmt: skip


def _build(recompute: str, train_vision: bool) -> Any:
    from neva_tools.mappings.clip import ClipVisionArch, transformer_config
    from neva_tools.model.neva import NevaParts, build_neva_model, freeze
    from neva_tools.model.recompute import apply_recompute

    v = SMALL_VISION
    arch = ClipVisionArch(image_size=v.image, patch_size=v.patch, hidden_size=v.hidden, num_layers=SMALL_VISION_LAYERS,
                          num_heads=v.heads, ffn_hidden_size=v.ffn, activation="quick_gelu")  # fmt: skip
    vision_config = apply_recompute(transformer_config(arch, 1, select_layer=-2), RECOMPUTE_KEYS[recompute], "vision")
    parts = NevaParts(_llm_config(recompute), SMALL_LLM.vocab, vision_config, v.image, v.patch, "mlp2x_gelu")
    model = build_neva_model(parts)
    freeze(model, llm=False, vision=not train_vision)
    return model


class SavedTensorMeter:
    """Unique storage bytes that autograd saves for backward, by part of the model and per LLM layer call.

    ``pack``/``unpack`` are the hooks for ``torch.autograd.graph.saved_tensors_hooks``; :meth:`watch` registers the
    forward (pre-)hooks that say which part is running. A storage is counted once per phase (in the part that saved
    it first) and once per layer call; parameters are skipped. :meth:`phase` returns what one phase saved and starts
    the next: saved tensors stay alive until backward, so within the forward phase no storage is freed and reused,
    while in backward (where freed memory is reused) only the per-layer-call figures are meaningful.
    """

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.stack = ["rest"]
        self._reset()

    def _reset(self) -> None:
        self.seen: dict[int, int] = {}
        self.by_part: dict[str, int] = defaultdict(int)
        self.layer_calls: list[int] = []  # bytes saved by each LLM layer call
        self._layer_seen: set[int] | None = None

    def pack(self, tensor: Any) -> Any:
        storage = tensor.untyped_storage()
        ptr, size = storage.data_ptr(), storage.nbytes()
        if not ptr or ptr in self.exclude:
            return tensor
        if ptr not in self.seen:
            self.seen[ptr] = size
            self.by_part[self.stack[-1]] += size
        if self._layer_seen is not None and ptr not in self._layer_seen:
            self._layer_seen.add(ptr)
            self.layer_calls[-1] += size
        return tensor

    @staticmethod
    def unpack(tensor: Any) -> Any:
        return tensor

    def phase(self) -> dict[str, Any]:
        """What was saved since the last call: total, by part, per LLM layer call."""
        saved = {"total": sum(self.seen.values()), "by_part": dict(sorted(self.by_part.items())),
                 "layer_calls": self.layer_calls}  # fmt: skip
        self._reset()
        return saved

    def watch(self, module: Any, part: str, *, layer: bool = False) -> list[Any]:
        """Attribute what ``module``'s forward saves to ``part``; ``layer``: also record each call's bytes."""

        def enter(*_: Any) -> None:
            self.stack.append(part)
            if layer:
                self._layer_seen = set()
                self.layer_calls.append(0)

        def leave(*_: Any) -> None:
            self.stack.pop()
            if layer:
                self._layer_seen = None

        return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]


def _storage_bytes(tensors: Any) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _measure(optimizer_name: str, recompute: str, train_vision: bool) -> dict[str, Any]:
    """One training step of the small NeVA in this configuration; what this rank holds."""
    import torch
    from train import make_batch

    from neva_tools.model.cpu_compat import model_parallel_seed
    from neva_tools.train import megatron_optim as mo
    from neva_tools.train.module import llava_loss
    from neva_tools.train.optim import OptimSettings

    model_parallel_seed(1234)
    model = _build(recompute, train_vision)
    distributed = mo.uses_distributed_optimizer(optimizer_name)
    chunks = mo.wrap_model(model, precision="bf16", use_distributed_optimizer=distributed)
    optimizer = mo.build_optimizer(chunks, OptimSettings(lr=1e-4), name=optimizer_name)
    batch = make_batch(SMALL_VISION.patches, batch=MICRO_BATCH, text_len=TEXT_LEN, image_size=SMALL_VISION.image,
                       vocab=SMALL_LLM.vocab)  # fmt: skip
    data = batch["ours"]
    params = list(chunks[0].parameters())
    meter = SavedTensorMeter({p.untyped_storage().data_ptr() for p in params})
    language = model.language_model
    handles = meter.watch(language.decoder, "llm_layers") + meter.watch(model.vision_projection, "projector")
    handles += meter.watch(language.decoder.final_layernorm, "llm_head") + meter.watch(model.vision_model, "vision")
    handles += meter.watch(language.output_layer, "llm_head")
    for layer in language.decoder.layers:
        handles += meter.watch(layer, "llm_layers", layer=True)

    mo.zero_grad(chunks, optimizer)
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        loss = llava_loss(chunks[0], data)[0]
    forward = meter.phase()
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        mo.scale_loss(optimizer, loss).backward()
    backward = meter.phase()
    result = mo.optimizer_step(chunks, optimizer)
    for handle in handles:
        handle.remove()
    if not result.success:
        raise RuntimeError("the optimizer step failed")

    ddp = chunks[0]
    buffers = list(ddp.buffers) + list(getattr(ddp, "expert_parallel_buffers", []))
    grads = sum(b.grad_data.numel() * b.grad_data.element_size() for b in buffers)
    grads += sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    state = mo.optimizer_state_bytes(optimizer, chunks)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    seq = int(data["input_ids"].shape[1]) - 1 + SMALL_VISION.patches
    labelled = int((data["labels"] != -100).sum())
    return {
        "params": _storage_bytes(params),
        "grads": grads,
        "optimizer": state.total,
        "optimizer_main_params": state.main_params,
        "optimizer_moments": state.moments,
        "activations": forward["total"],
        "activations_by_part": forward["by_part"],
        "llm_layer_calls_forward": forward["layer_calls"],
        "llm_layer_calls_recomputed": backward["layer_calls"],
        "param_count": sum(p.numel() for p in params),
        "trainable_param_count": trainable,
        "grad_buffer_padding": sum(b.grad_data.numel() for b in buffers) - trainable,
        "seq": seq,
        "labelled": labelled,
        "loss": round(loss.item(), 4),
    }


def _worker(rank: int, world_size: int, port: int, queue: Any, train_vision: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))  # fmt: skip
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        del os.environ[key]
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/train.py's make_batch
    import torch

    torch.set_num_threads(1)
    from neva_tools.model.parallel import destroy_distributed, init_distributed

    init_distributed(tp=1, seed=1234)
    try:
        queue.put((rank, {f"{o}/{r}": _measure(o, r, train_vision) for o in OPTIMIZERS for r in ("none", "full")}))
    finally:
        destroy_distributed()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def _compare(ranks: list[dict[str, Any]], train_vision: bool, optimizer: str, recompute: str) -> dict[str, Any]:
    """The larger rank's measurements, the formula's prediction and measured/predicted."""
    keys = ("params", "grads", "optimizer", "activations")
    measured = {k: max(r[k] for r in ranks) for k in keys}
    first = ranks[0]
    measured.update(
        optimizer_main_params=max(r["optimizer_main_params"] for r in ranks),
        optimizer_moments=max(r["optimizer_moments"] for r in ranks),
        activations_by_part=first["activations_by_part"],
        param_count=first["param_count"],
        trainable_param_count=first["trainable_param_count"],
        grad_buffer_padding=max(r["grad_buffer_padding"] for r in ranks),
        total=sum(measured[k] for k in keys),
    )
    predicted = predict_memory(SMALL_LLM, SMALL_VISION, ProjectorShape(SMALL_VISION.hidden, SMALL_LLM.hidden), tp=1,
                               dp=len(ranks), micro_batch=MICRO_BATCH, seq=first["seq"], optimizer=optimizer,
                               recompute=recompute, vision_trainable=train_vision,
                               labelled=first["labelled"])  # fmt: skip
    predicted_total = sum(predicted[k] for k in keys)
    ratio = {k: _ratio(measured[k], predicted[k]) for k in (*keys, "param_count", "trainable_param_count")}
    ratio["total"] = _ratio(measured["total"], predicted_total)
    per_layer = first["llm_layer_calls_recomputed"] if recompute == "full" else first["llm_layer_calls_forward"]
    return {
        "measured": measured,
        "predicted": {**predicted, "total": predicted_total},
        "ratio_measured_over_predicted": ratio,
        "llm_layer_call_bytes": per_layer,
        "llm_layer_call_bytes_phase": "recomputed in backward" if recompute == "full" else "forward",
        "loss": [r["loss"] for r in ranks],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-vision", action="store_true", help="train the vision encoder too (stage 2 freezes it)")
    args = parser.parse_args()

    import torch
    import torch.multiprocessing as mp

    start = time.perf_counter()
    world_size = 2
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.spawn(_worker, args=(world_size, _free_port(), queue, args.train_vision), nprocs=world_size, join=True)
    ranks: dict[int, dict[str, Any]] = dict(queue.get() for _ in range(world_size))
    configs = {}
    for optimizer in OPTIMIZERS:
        for recompute in ("none", "full"):
            key = f"{optimizer}/{recompute}"
            configs[key] = _compare([ranks[r][key] for r in range(world_size)], args.train_vision, optimizer,
                                    recompute)  # fmt: skip
    none = configs["fused_adam/none"]
    s, b, h = ranks[0]["fused_adam/none"]["seq"], MICRO_BATCH, SMALL_LLM.hidden
    calls = none["llm_layer_call_bytes"]
    layer_measured = sum(calls) / len(calls)
    layer_predicted = layer_activation_bytes(s, b, h, SMALL_LLM.heads, 1, flash=True, sequence_parallel=False)
    full_working = max(configs["fused_adam/full"]["llm_layer_call_bytes"] or [0])
    result = {
        "benchmark": "memory_per_rank",
        "device": "cpu",
        "processes": world_size,
        "backend": "gloo",
        "parallelism": {"tp": 1, "dp": world_size},
        "precision": "bf16 weights, fp32 master weights, fp32 DDP gradient buffers",
        "torch": torch.__version__,
        "megatron_core": _megatron_version(),
        "model": {
            "llm": asdict(SMALL_LLM),
            "vision": {**asdict(SMALL_VISION), "layers_in_checkpoint": SMALL_VISION_LAYERS, "select_layer": -2},
            "projector": "mlp2x_gelu",
            "trained": "LLM + projector + vision" if args.train_vision else "LLM + projector (vision frozen)",
        },
        "batch": {
            "micro_batch": MICRO_BATCH,
            "llm_seq": s,
            "image_tokens": SMALL_VISION.patches,
            "labelled_tokens": ranks[0]["fused_adam/none"]["labelled"],
        },
        "measured_rank": "the larger of the two ranks' figures",
        "configs": configs,
        "llm_layer": {
            "unit": "bytes per layer per token (s*b); the formula's 34*h = 16-bit Korthikanti per-layer estimate",
            "measured_no_recompute": round(layer_measured / (s * b), 1),
            "predicted_no_recompute": round(layer_predicted / (s * b), 1),
            "ratio": _ratio(layer_measured, layer_predicted),
            "measured_over_h": round(layer_measured / (s * b * h), 2),
            "measured_full_recompute_saved_per_layer_over_h": round(
                configs["fused_adam/full"]["measured"]["activations_by_part"].get("llm_layers", 0)
                / (SMALL_LLM.layers * s * b * h),
                2,
            ),
            "measured_full_recompute_working_set_over_h": round(full_working / (s * b * h), 2),
        },
        "llava_1_5_predictions": llava_predictions(),
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(result))
    return 0


def _megatron_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("megatron-core")
    except PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
