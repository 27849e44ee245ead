"""Activation memory per micro-batch: what autograd saves for backward, tensor by tensor, for our local specs.

Per LLM layer, ``n = s·b`` tokens, ``a`` bytes per activation element (2 in bf16/fp16, 4 in fp32), TP ``t``, no
sequence parallelism (the norms and the inputs of column-parallel linears are whole on every TP rank):

* each norm keeps its input (``n·h·a``) and fp32 statistics (RMSNorm ``4n``, LayerNorm ``8n``);
* SDPA (flash / memory-efficient on GPU, the fused kernel on CPU) keeps Q, K, V and its output
  (``n·(2q + 2kv)/t·a``, ``q`` and ``kv`` the query and key/value widths) and an fp32 log-sum-exp per head; no
  ``s × s`` tensor. Selective recompute checkpoints it instead: Q, K, the fused QKV output and four RoPE tables;
* the MLP keeps ``gate``, ``up`` and ``silu(gate)`` (SwiGLU: ``3n·f/t·a``, ``neva_tools.model.swiglu``; on CUDA
  megatron-core's fused bias-SwiGLU keeps only ``linear_fc1``'s output, ``2n·f/t·a``) or the GELU input (``n·f/t·a``);
* a trainable layer also keeps the inputs of its four linears for the weight gradients (``n·h·a`` twice,
  ``n·q/t·a``, ``n·f/t·a``); a frozen one does not (megatron-core's frozen-weight linear keeps only the weight),
  except ``linear_fc1``'s input at TP 1 on CPU (our fused SwiGLU linear keeps it);
* full recompute keeps each checkpointed chunk's input (``n·h·a``) and recomputes one chunk's working set in
  backward (reported as ``recompute_peak``); ``block`` recomputes only the first ``num_layers`` layers.

The head (last stage) keeps the final norm's input, ``output_layer``'s input when it is trained, and fp32 logits over
the vocabulary shard at the labelled positions (cross-entropy). The vision tower, when trained, keeps the same per
layer (LayerNorm, full MHA, GELU) plus its images and ``ln_pre`` input; frozen, it keeps nothing. A trained
projector keeps its input and the GELU input and ``linear_fc2`` input. Dropout is assumed off (LLaVA's 0).
"""

from __future__ import annotations

from dataclasses import dataclass

from neva_tools.plan.model import PlannedModel

FP32 = 4


@dataclass(frozen=True)
class Batch:
    """One micro-batch as the LLM and the tower see it."""

    micro_batch: int
    seq: int  # LLM tokens per row (after image expansion)
    tiles: int = 1  # vision-tower images per row (AnyRes tiles × images)
    image_tokens: int = 0  # projector outputs per row
    labelled: int | None = None  # tokens with logits per row (None: all)


@dataclass(frozen=True)
class Recompute:
    """megatron-core's recompute settings (:mod:`neva_tools.model.recompute`)."""

    granularity: str | None = None  # selective or full
    method: str | None = None  # uniform or block (full)
    num_layers: int = 1


@dataclass(frozen=True)
class ActivationBytes:
    """Saved for backward by one micro-batch on one stage, and the extra working set of a full-recompute chunk."""

    saved: int
    recompute_peak: int = 0


def layer_bytes(*, n: int, s: int, h: int, q: int, kv: int, heads: int, f: int, head_dim: int, gated: bool,
                layernorm: bool, trainable: bool, selective: bool, a: int, cuda: bool,
                tp1_fused: bool) -> int:  # fmt: skip
    """What one transformer layer saves for ``n`` tokens (``q``, ``kv``, ``heads``, ``f``: this TP rank's)."""
    norm = n * h * a + n * FP32 * (2 if layernorm else 1)
    if selective:
        attention = n * (2 * q + 3 * kv) * a + 4 * s * head_dim * FP32
    else:
        attention = n * (2 * q + 2 * kv) * a + n * heads * FP32
    mlp = n * f * a  # the GELU input
    if gated:
        mlp = n * f * a * (2 if cuda else 3) + (n * h * a if tp1_fused and not trainable else 0)
    weights_inputs = n * (2 * h + q + f) * a if trainable else 0
    return 2 * norm + attention + mlp + weights_inputs


def _block(model: PlannedModel, *, layers: int, n: int, s: int, tp: int, a: int, trainable: bool,
           recompute: Recompute, cuda: bool) -> ActivationBytes:  # fmt: skip
    llm = model.llm
    one = layer_bytes(n=n, s=s, h=llm.hidden, q=llm.heads * llm.kv_channels // tp,
                      kv=llm.groups * llm.kv_channels // tp, heads=llm.heads // tp, f=llm.ffn // tp,
                      head_dim=llm.kv_channels, gated=llm.gated, layernorm=llm.normalization == "LayerNorm",
                      trainable=trainable, selective=recompute.granularity == "selective", a=a, cuda=cuda,
                      tp1_fused=tp == 1 and not cuda and llm.gated and not llm.bias)  # fmt: skip
    if recompute.granularity != "full":
        return ActivationBytes(layers * one + 2 * s * llm.kv_channels * FP32)  # + the RoPE tables, once
    chunk = min(recompute.num_layers, layers)
    if recompute.method == "block":
        return ActivationBytes(chunk * n * llm.hidden * a + (layers - chunk) * one, one)
    chunks = -(-layers // chunk)
    return ActivationBytes(chunks * n * llm.hidden * a + s * llm.kv_channels * FP32, chunk * one)


def stage_activations(model: PlannedModel, batch: Batch, *, tp: int, layers: int, first: bool, last: bool,
                      precision: str, recompute: Recompute, cuda: bool = True) -> ActivationBytes:  # fmt: skip
    """What one micro-batch saves on a stage holding ``layers`` decoder layers (``first``: with the embedding, the
    tower and the projector; ``last``: with the head)."""
    a = FP32 if precision == "32" else 2
    b, s = batch.micro_batch, batch.seq
    n = b * s
    llm = model.llm
    # the LLM's activations need keeping when anything before or in it trains
    upstream = not model.freeze_projector or (model.vision is not None and not model.freeze_vision)
    needs_grad = not model.freeze_llm or (model.vision is not None and upstream)
    result = ActivationBytes(0)
    if needs_grad:
        result = _block(model, layers=layers, n=n, s=s, tp=tp, a=a, trainable=not model.freeze_llm,
                        recompute=recompute, cuda=cuda)  # fmt: skip
    saved, peak = result.saved, result.recompute_peak
    if first:
        saved += n * 8  # token ids
        vision = model.vision
        if vision is not None:
            tokens = b * batch.image_tokens
            if not model.freeze_projector:
                hv = vision.arch.hidden_size
                saved += tokens * hv * a + (2 * tokens * llm.hidden // tp * a if model.projector != "linear" else 0)
            if not model.freeze_vision:
                arch, images = vision.arch, b * batch.tiles
                m = images * vision.tokens
                one = layer_bytes(n=m, s=vision.tokens, h=arch.hidden_size, q=arch.hidden_size // tp,
                                  kv=arch.hidden_size // tp, heads=arch.num_heads // tp,
                                  f=arch.ffn_hidden_size // tp, head_dim=arch.head_dim, gated=False, layernorm=True,
                                  trainable=True, selective=recompute.granularity == "selective", a=a, cuda=cuda,
                                  tp1_fused=False)  # fmt: skip
                front = images * 3 * arch.image_size**2 * a + m * arch.hidden_size * a + 2 * m * FP32
                if recompute.granularity == "full":
                    saved += front + vision.layers * m * arch.hidden_size * a
                    peak = max(peak, one)
                else:
                    saved += front + vision.layers * one
    if last and needs_grad:
        labelled = b * (batch.labelled if batch.labelled is not None else s)
        saved += n * llm.hidden * a + n * FP32 * (2 if llm.normalization == "LayerNorm" else 1)
        saved += labelled * llm.hidden * a if not model.freeze_llm else 0
        saved += labelled * llm.padded_vocab(tp) // tp * FP32
    return ActivationBytes(saved, peak)


def in_flight(pp: int, pp_rank: int, vpp: int, microbatches: int) -> float:
    """Micro-batches whose activations a pipeline rank holds at once, in units of the rank's whole stage: the warm-up
    forwards of megatron-core's schedule (``get_pp_rank_microbatches``: ``pp - rank - 1`` for 1F1B,
    ``2·(pp - rank - 1) + (vpp - 1)·pp`` chunk-micro-batches of ``1/vpp`` stage each when interleaved) plus the one
    in its steady 1F1B phase, never more than the step has."""
    if pp == 1:
        return 1.0
    from types import SimpleNamespace

    from megatron.core.pipeline_parallel.schedules import get_pp_rank_microbatches

    group = SimpleNamespace(size=lambda: pp, rank=lambda: pp_rank)
    schedule = SimpleNamespace(pp_group=group, virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None)
    total, _, warmup, _ = get_pp_rank_microbatches(microbatches, vpp, pp, p2p_communicator=schedule)
    return min(warmup + 1, total) / vpp
