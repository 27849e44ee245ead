"""The parameters one rank holds, in megatron-core's registration order, from the model's shapes alone.

Each list mirrors ``named_parameters()`` of the module megatron-core builds with our local specs (a ``GPTModel``
stage, the ``CLIPViTModel`` tower, the ``MultimodalProjector``): a module's own parameters first, then its children
in the order they are assigned. Tensor-parallel splits follow megatron-core's layers: column-parallel weights and
biases split dim 0, row-parallel weights dim 1 (their biases replicated), vocab-parallel embeddings dim 0, norms and
the ViT's embeddings replicated. ``tests/plan`` checks names and shapes against built models at several TP/PP sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from neva_tools.plan.shapes import LlmShape, VisionShape


@dataclass(frozen=True)
class Param:
    """One parameter of a rank: its name (as in the built module), shape, and DDP's bucketing flag."""

    name: str
    shape: tuple[int, ...]
    trainable: bool = True
    shared_embedding: bool = False  # megatron-core's own bucket with the distributed optimizer (tied PP copies)

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


def _norm(prefix: str, width: int, layernorm: bool) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{prefix}.weight", (width,))] + ([(f"{prefix}.bias", (width,))] if layernorm else [])


def _layer(prefix: str, *, h: int, q: int, kv: int, ffn_rows: int, ffn: int, tp: int, layernorm: bool, bias: bool,
           qkv_bias: bool) -> list[tuple[str, tuple[int, ...]]]:  # fmt: skip
    """One transformer layer of megatron-core's local spec: norm, attention (proj, then qkv), norm, MLP."""
    out = _norm(f"{prefix}.input_layernorm", h, layernorm)
    out.append((f"{prefix}.self_attention.linear_proj.weight", (h, q // tp)))
    out += [(f"{prefix}.self_attention.linear_proj.bias", (h,))] if bias else []
    out.append((f"{prefix}.self_attention.linear_qkv.weight", ((q + 2 * kv) // tp, h)))
    out += [(f"{prefix}.self_attention.linear_qkv.bias", ((q + 2 * kv) // tp,))] if bias or qkv_bias else []
    out += _norm(f"{prefix}.pre_mlp_layernorm", h, layernorm)
    out.append((f"{prefix}.mlp.linear_fc1.weight", (ffn_rows // tp, h)))
    out += [(f"{prefix}.mlp.linear_fc1.bias", (ffn_rows // tp,))] if bias else []
    out.append((f"{prefix}.mlp.linear_fc2.weight", (h, ffn // tp)))
    out += [(f"{prefix}.mlp.linear_fc2.bias", (h,))] if bias else []
    return out


def llm_params(llm: LlmShape, *, tp: int, layers: range, pre_process: bool, post_process: bool, pp: int,
               trainable: bool = True, prefix: str = "") -> list[Param]:  # fmt: skip
    """A ``GPTModel`` stage holding the decoder ``layers`` (global indices; named from 0 on each stage)."""
    vocab = llm.padded_vocab(tp)
    layernorm = llm.normalization == "LayerNorm"
    named: list[tuple[str, tuple[int, ...]]] = []
    shared: set[str] = set()
    if pre_process:
        named.append((f"{prefix}embedding.word_embeddings.weight", (vocab // tp, llm.hidden)))
        if llm.tied and pp > 1 and not post_process:
            shared.add(named[-1][0])
    for local in range(len(layers)):
        named += _layer(f"{prefix}decoder.layers.{local}", h=llm.hidden, q=llm.heads * llm.kv_channels,
                        kv=llm.groups * llm.kv_channels, ffn_rows=llm.ffn * (2 if llm.gated else 1), ffn=llm.ffn,
                        tp=tp, layernorm=layernorm, bias=llm.bias, qkv_bias=llm.qkv_bias)  # fmt: skip
    if post_process:
        named += _norm(f"{prefix}decoder.final_layernorm", llm.hidden, layernorm)
        if not llm.tied or not pre_process:
            named.append((f"{prefix}output_layer.weight", (vocab // tp, llm.hidden)))
            if llm.tied:
                shared.add(named[-1][0])
    return [Param(n, s, trainable, n in shared) for n, s in named]


def vision_params(vision: VisionShape, *, tp: int, trainable: bool = True, prefix: str = "") -> list[Param]:
    """The ``CLIPViTModel`` tower: CLIP (class token, ``ln_pre``, bias-free patch convolution) or SigLIP (biased
    convolution, ``ln_post`` dropped), then the layers up to ``vision_select_layer``."""
    arch, h, f = vision.arch, vision.arch.hidden_size, vision.arch.ffn_hidden_size
    named: list[tuple[str, tuple[int, ...]]] = []
    if not vision.siglip:
        named.append((f"{prefix}class_token", (1, 1, h)))
        named += _norm(f"{prefix}ln_pre", h, True)
    named.append((f"{prefix}conv1.weight", (h, 3, arch.patch_size, arch.patch_size)))
    named += [(f"{prefix}conv1.bias", (h,))] if vision.siglip else []
    named.append((f"{prefix}position_embeddings.weight", (vision.tokens, h)))
    for i in range(vision.layers):
        named += _layer(f"{prefix}decoder.layers.{i}", h=h, q=h, kv=h, ffn_rows=f, ffn=f, tp=tp, layernorm=True,
                        bias=True, qkv_bias=True)  # fmt: skip
    return [Param(n, s, trainable) for n, s in named]


def projector_params(kind: str, vision_hidden: int, hidden: int, *, tp: int, newline: bool, trainable: bool = True,
                     prefix: str = "") -> list[Param]:  # fmt: skip
    """The ``MultimodalProjector``: ``mlp2x_gelu`` (column fc1, row fc2, biased) or ``linear`` (one column-parallel
    affine layer); LLaVA-NeXT's ``image_newline`` (``spatial_unpad``), a parameter of the projector itself, first."""
    named: list[tuple[str, tuple[int, ...]]] = [(f"{prefix}image_newline", (hidden,))] if newline else []
    if kind == "linear":
        named += [
            (f"{prefix}encoder.weight", (hidden // tp, vision_hidden)),
            (f"{prefix}encoder.bias", (hidden // tp,)),
        ]
    else:
        named += [(f"{prefix}encoder.linear_fc1.weight", (hidden // tp, vision_hidden)),
                  (f"{prefix}encoder.linear_fc1.bias", (hidden // tp,)),
                  (f"{prefix}encoder.linear_fc2.weight", (hidden, hidden // tp)),
                  (f"{prefix}encoder.linear_fc2.bias", (hidden,))]  # fmt: skip
    return [Param(n, s, trainable) for n, s in named]


def stage_layers(num_layers: int, pp: int, vpp: int, pp_rank: int, chunk: int) -> range:
    """The decoder layers of model chunk ``chunk`` on pipeline rank ``pp_rank`` (megatron-core's even split; with
    ``vpp`` chunks per rank, chunk c of rank r holds the (c·pp + r)-th slice of ``num_layers / (pp·vpp)`` layers)."""
    per = num_layers // (pp * vpp)
    start = (chunk * pp + pp_rank) * per
    return range(start, start + per)
