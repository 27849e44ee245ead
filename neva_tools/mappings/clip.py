"""CLIP vision towers (open_clip and Hugging Face) → megatron-core ``CLIPViTModel``: architecture and weight tables.

Names on the megatron-core side are ``CLIPViTModel``'s own (local layer spec); inside ``LLaVAModel`` they gain the
prefix ``vision_model.`` (:data:`neva_tools.mappings.vit.LLAVA_PREFIX`). Hugging Face names are given without the
``vision_model.`` prefix: transformers 5 saves ``CLIPVisionModel`` without it, transformers 4 and full
``CLIPModel`` checkpoints with it; both are accepted. The conversion itself is :mod:`neva_tools.mappings.vit`.

NeVA uses the output of transformer layer ``select_layer`` (default -2: the second-to-last layer, LLaVA's
``mm_vision_select_layer``; HF ``hidden_states[select_layer]``, where ``hidden_states[0]`` is the ``ln_pre``
output) with the class token dropped. megatron-core 0.16.1 has no feature-layer option: ``LLaVAModel`` takes the
output of the ViT's last built layer (``self.vision_model(images)``, then drops ``class_token_len`` tokens), and
``CLIPViTModel`` (``model_subtype="clip"``) applies ``ln_pre`` but no ``ln_post``. So the layer is selected by
building only the layers up to it (``num_layers + select_layer + 1``, as vLLM and TGI do for LLaVA; a non-negative
``select_layer`` k keeps k layers, HF's ``hidden_states[k]``; 0, the ``ln_pre`` output, cannot be built). Hence
open_clip ``ln_post`` and ``proj`` (and attentional poolers) and HF ``post_layernorm`` are never used: they are in
the ignore sets below; the layers after the selected one must be present but are skipped. Any other unknown or
missing tensor raises ``NevaError``.

Activation: OpenAI CLIP (HF ``hidden_act: quick_gelu``, open_clip ``*-quickgelu`` models and the ``openai`` tag)
uses QuickGELU, ``x * sigmoid(1.702 x)``; other open_clip models use exact (erf) GELU. ``TransformerConfig`` takes
any callable as ``activation_func``; the MLP then calls it on ``linear_fc1`` output + bias (bias-activation fusion
is off: megatron-core's fused ``bias_gelu`` is the tanh approximation, and 0.16.1 refuses the fusion for a
non-gated quick_gelu). megatron-core 0.16.1 ships the same formula as ``megatron.core.fusions.fused_bias_geglu.
quick_gelu`` (and ``megatron.core.activations.quick_gelu``), but wrapped in ``torch.compile`` (``jit_fuser``):
its first call compiles with inductor (26 s on a CPU, and a C++ compiler is needed), so :func:`quick_gelu` below
is a plain function with the same maths.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from neva_tools.errors import NevaError
from neva_tools.mappings.base import Entry, Split
from neva_tools.mappings.vit import convert_to_hf, convert_to_mcore, entries

if TYPE_CHECKING:
    from megatron.core.transformer import TransformerConfig


_M = "decoder.layers.{i}."
_O = "transformer.resblocks.{i}."
_H = "encoder.layers.{i}."

#: open_clip ``VisionTransformer`` (``model.visual``) → ``CLIPViTModel``. ``in_proj_*`` is ``[q; k; v]``.
OPEN_CLIP_TABLE: tuple[Entry, ...] = (
    Entry("class_token", ("class_embedding",), Split.REPLICATED),  # [h] → [1, 1, h]
    Entry("conv1.weight", ("conv1.weight",), Split.REPLICATED),
    Entry("position_embeddings.weight", ("positional_embedding",), Split.REPLICATED),
    Entry("ln_pre.weight", ("ln_pre.weight",), Split.REPLICATED),
    Entry("ln_pre.bias", ("ln_pre.bias",), Split.REPLICATED),
    Entry(_M + "input_layernorm.weight", (_O + "ln_1.weight",), Split.REPLICATED),
    Entry(_M + "input_layernorm.bias", (_O + "ln_1.bias",), Split.REPLICATED),
    Entry(_M + "self_attention.linear_qkv.weight", (_O + "attn.in_proj_weight",), Split.QKV),
    Entry(_M + "self_attention.linear_qkv.bias", (_O + "attn.in_proj_bias",), Split.QKV),
    Entry(_M + "self_attention.linear_proj.weight", (_O + "attn.out_proj.weight",), Split.ROW),
    Entry(_M + "self_attention.linear_proj.bias", (_O + "attn.out_proj.bias",), Split.REPLICATED),
    Entry(_M + "pre_mlp_layernorm.weight", (_O + "ln_2.weight",), Split.REPLICATED),
    Entry(_M + "pre_mlp_layernorm.bias", (_O + "ln_2.bias",), Split.REPLICATED),
    Entry(_M + "mlp.linear_fc1.weight", (_O + "mlp.c_fc.weight",), Split.COLUMN),
    Entry(_M + "mlp.linear_fc1.bias", (_O + "mlp.c_fc.bias",), Split.COLUMN),
    Entry(_M + "mlp.linear_fc2.weight", (_O + "mlp.c_proj.weight",), Split.ROW),
    Entry(_M + "mlp.linear_fc2.bias", (_O + "mlp.c_proj.bias",), Split.REPLICATED),
)

#: Hugging Face ``CLIPVisionModel`` (names without ``vision_model.``) → ``CLIPViTModel``.
HF_TABLE: tuple[Entry, ...] = (
    Entry("class_token", ("embeddings.class_embedding",), Split.REPLICATED),  # [h] → [1, 1, h]
    Entry("conv1.weight", ("embeddings.patch_embedding.weight",), Split.REPLICATED),
    Entry("position_embeddings.weight", ("embeddings.position_embedding.weight",), Split.REPLICATED),
    Entry("ln_pre.weight", ("pre_layrnorm.weight",), Split.REPLICATED),
    Entry("ln_pre.bias", ("pre_layrnorm.bias",), Split.REPLICATED),
    Entry(_M + "input_layernorm.weight", (_H + "layer_norm1.weight",), Split.REPLICATED),
    Entry(_M + "input_layernorm.bias", (_H + "layer_norm1.bias",), Split.REPLICATED),
    Entry(
        _M + "self_attention.linear_qkv.weight",
        (_H + "self_attn.q_proj.weight", _H + "self_attn.k_proj.weight", _H + "self_attn.v_proj.weight"),
        Split.QKV,
    ),
    Entry(
        _M + "self_attention.linear_qkv.bias",
        (_H + "self_attn.q_proj.bias", _H + "self_attn.k_proj.bias", _H + "self_attn.v_proj.bias"),
        Split.QKV,
    ),
    Entry(_M + "self_attention.linear_proj.weight", (_H + "self_attn.out_proj.weight",), Split.ROW),
    Entry(_M + "self_attention.linear_proj.bias", (_H + "self_attn.out_proj.bias",), Split.REPLICATED),
    Entry(_M + "pre_mlp_layernorm.weight", (_H + "layer_norm2.weight",), Split.REPLICATED),
    Entry(_M + "pre_mlp_layernorm.bias", (_H + "layer_norm2.bias",), Split.REPLICATED),
    Entry(_M + "mlp.linear_fc1.weight", (_H + "mlp.fc1.weight",), Split.COLUMN),
    Entry(_M + "mlp.linear_fc1.bias", (_H + "mlp.fc1.bias",), Split.COLUMN),
    Entry(_M + "mlp.linear_fc2.weight", (_H + "mlp.fc2.weight",), Split.ROW),
    Entry(_M + "mlp.linear_fc2.bias", (_H + "mlp.fc2.bias",), Split.REPLICATED),
)

#: open_clip tensors after the transformer (pooling, ``ln_post``, projection): not used by layer features.
OPEN_CLIP_IGNORED = ("proj", "ln_post.", "attn_pool.", "attn_pool_contrastive.")
#: HF tensors not used: ``post_layernorm`` (after the last layer), the ``position_ids`` buffer of old checkpoints,
#: and the text tower, projections and ``logit_scale`` of a full ``CLIPModel`` checkpoint.
HF_IGNORED = (
    "post_layernorm.",
    "embeddings.position_ids",
    "text_model.",
    "visual_projection.",
    "text_projection.",
    "logit_scale",
)
HF_PREFIX = "vision_model."

#: Local-spec layer-norm names → Transformer-Engine-spec names (Megatron-LM's own CLIP checkpoints).
TE_SPEC_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's QuickGELU, ``x * sigmoid(1.702 x)`` (open_clip ``QuickGELU``, HF ``quick_gelu``)."""
    return x * torch.sigmoid(1.702 * x)


#: Activation name → the ``activation_func`` given to megatron-core.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": quick_gelu,
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
}
#: HF ``hidden_act`` → our activation name.
HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
#: Our activation name → the HF ``hidden_act`` that computes it (``gelu_pytorch_tanh`` is exactly ``gelu_tanh``).
ACTIVATION_TO_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
#: open_clip's final layer norm → HF ``post_layernorm`` (both unused by layer features; kept for complete exports).
OPEN_CLIP_POST_NORM = {"ln_post.weight": "post_layernorm.weight", "ln_post.bias": "post_layernorm.bias"}


@dataclass(frozen=True)
class ClipVisionArch:
    """The architecture facts of a CLIP ViT vision tower (square images), independent of checkpoint format."""

    image_size: int
    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_hidden_size: int
    layernorm_epsilon: float = 1e-5
    activation: str = "quick_gelu"  # a key of ACTIVATIONS

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise NevaError(f"image size ({self.image_size}) must be a multiple of the patch size ({self.patch_size})")
        if self.hidden_size % self.num_heads:
            raise NevaError(f"hidden size ({self.hidden_size}) must be divisible by the heads ({self.num_heads})")
        if self.activation not in ACTIVATIONS:
            raise NevaError(f"activation {self.activation!r} is not supported; supported: {', '.join(ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.hidden_size // self.num_heads

    @property
    def num_patches(self) -> int:
        """Patch tokens per image (the features NeVA keeps; the class token is dropped)."""
        return (self.image_size // self.patch_size) ** 2

    def kept_layers(self, select_layer: int = -2) -> int:
        """Transformer layers run to produce the features of ``select_layer`` (HF ``hidden_states`` indexing)."""
        kept = select_layer if select_layer >= 0 else self.num_layers + 1 + select_layer
        if not 1 <= kept <= self.num_layers:
            raise NevaError(
                f"vision select_layer ({select_layer}) must pick a transformer layer output of the "
                f"{self.num_layers}-layer vision encoder: 1..{self.num_layers} or -{self.num_layers}..-1"
            )
        return kept

    @classmethod
    def from_open_clip(cls, visual: torch.nn.Module) -> ClipVisionArch:
        """Read an open_clip ``VisionTransformer`` (``model.visual``); unsupported variants raise ``NevaError``."""
        from open_clip.transformer import QuickGELU, ResidualAttentionBlock, VisionTransformer

        if not isinstance(visual, VisionTransformer):
            raise NevaError(f"the open_clip vision tower is a {type(visual).__name__}, not a ViT (VisionTransformer)")
        blocks = list(visual.transformer.resblocks)
        block = blocks[0]
        if not all(type(b) is ResidualAttentionBlock for b in blocks):
            raise NevaError("open_clip custom attention blocks (qk_norm, scale_* options) are not supported")
        if not isinstance(block.ls_1, torch.nn.Identity):
            raise NevaError("open_clip LayerScale (ls_init_value) is not supported by megatron-core's CLIPViTModel")
        if isinstance(visual.ln_pre, torch.nn.Identity):
            raise NevaError("open_clip no_ln_pre=True is not supported: megatron-core's CLIPViTModel applies ln_pre")
        (height, width), (patch_h, patch_w) = visual.image_size, visual.patch_size
        if height != width or patch_h != patch_w:
            raise NevaError(f"only square images and patches are supported, found {visual.image_size} and patches "
                            f"{visual.patch_size}")  # fmt: skip
        act = block.mlp.gelu
        if isinstance(act, QuickGELU):
            activation = "quick_gelu"
        elif isinstance(act, torch.nn.GELU):
            activation = "gelu" if act.approximate == "none" else "gelu_tanh"
        else:
            raise NevaError(f"open_clip activation {type(act).__name__} is not supported")
        return cls(
            image_size=int(height),
            patch_size=int(patch_h),
            hidden_size=visual.conv1.out_channels,
            num_layers=len(blocks),
            num_heads=block.attn.num_heads,
            ffn_hidden_size=block.mlp.c_fc.out_features,
            layernorm_epsilon=float(block.ln_1.eps),
            activation=activation,
        )

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], source: str = "config.json") -> ClipVisionArch:
        """Read a HF ``CLIPVisionConfig`` dict (or a ``CLIPConfig`` dict: its ``vision_config``).

        Absent keys take ``transformers.CLIPVisionConfig``'s defaults (old ``CLIPModel`` configs omit them).
        """
        if cfg.get("model_type") == "clip" or "vision_config" in cfg:
            cfg = cfg.get("vision_config") or {}
        elif cfg.get("model_type") not in (None, "clip_vision_model"):
            raise NevaError(f"{source}: model_type {cfg['model_type']!r} is not a CLIP vision model; supported: "
                            "clip, clip_vision_model")  # fmt: skip
        hidden_act = cfg.get("hidden_act", "quick_gelu")
        if hidden_act not in HF_ACTIVATIONS:
            raise NevaError(f"{source}: hidden_act {hidden_act!r} is not supported; supported: "
                            f"{', '.join(HF_ACTIVATIONS)}")  # fmt: skip
        return cls(
            image_size=int(cfg.get("image_size", 224)),
            patch_size=int(cfg.get("patch_size", 32)),
            hidden_size=int(cfg.get("hidden_size", 768)),
            num_layers=int(cfg.get("num_hidden_layers", 12)),
            num_heads=int(cfg.get("num_attention_heads", 12)),
            ffn_hidden_size=int(cfg.get("intermediate_size", 3072)),
            layernorm_epsilon=float(cfg.get("layer_norm_eps", 1e-5)),
            activation=HF_ACTIVATIONS[hidden_act],
        )

    def to_hf_config(self) -> dict[str, Any]:
        """The HF ``CLIPVisionConfig`` dict of this tower (the inverse of :meth:`from_hf_config`)."""
        return {
            "model_type": "clip_vision_model",
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.ffn_hidden_size,
            "layer_norm_eps": self.layernorm_epsilon,
            "hidden_act": ACTIVATION_TO_HF[self.activation],
            "num_channels": 3,
        }

    def replace(self, **changes: Any) -> ClipVisionArch:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def mcore_splits(arch: ClipVisionArch, select_layer: int = -2) -> dict[str, Split]:
    """``CLIPViTModel`` tensor name → its tensor-parallel split kind."""
    return {name: split for name, _, split in entries(OPEN_CLIP_TABLE, arch, select_layer)}


def mcore_shapes(arch: ClipVisionArch, select_layer: int = -2) -> dict[str, tuple[int, ...]]:
    """The full (TP=1) shape of every ``CLIPViTModel`` tensor."""
    h, f = arch.hidden_size, arch.ffn_hidden_size
    layer = {
        "input_layernorm.weight": (h,),
        "input_layernorm.bias": (h,),
        "self_attention.linear_qkv.weight": (3 * h, h),
        "self_attention.linear_qkv.bias": (3 * h,),
        "self_attention.linear_proj.weight": (h, h),
        "self_attention.linear_proj.bias": (h,),
        "pre_mlp_layernorm.weight": (h,),
        "pre_mlp_layernorm.bias": (h,),
        "mlp.linear_fc1.weight": (f, h),
        "mlp.linear_fc1.bias": (f,),
        "mlp.linear_fc2.weight": (h, f),
        "mlp.linear_fc2.bias": (h,),
    }
    shapes = {
        "class_token": (1, 1, h),
        "conv1.weight": (h, 3, arch.patch_size, arch.patch_size),
        "position_embeddings.weight": (arch.num_patches + 1, h),
        "ln_pre.weight": (h,),
        "ln_pre.bias": (h,),
    }
    for i in range(arch.kept_layers(select_layer)):
        shapes.update({f"decoder.layers.{i}.{k}": v for k, v in layer.items()})
    return shapes


def open_clip_state_to_mcore(
    state_dict: Mapping[str, torch.Tensor], arch: ClipVisionArch, *, select_layer: int = -2
) -> dict[str, torch.Tensor]:
    """Full (TP=1) ``CLIPViTModel`` tensors from an open_clip ``model.visual.state_dict()``.

    A whole-model state dict (``visual.*`` names) is accepted too; its text tower is ignored.
    """
    if any(k.startswith("visual.") for k in state_dict):
        state_dict = {k.removeprefix("visual."): v for k, v in state_dict.items() if k.startswith("visual.")}
    return convert_to_mcore(state_dict, arch, OPEN_CLIP_TABLE, OPEN_CLIP_IGNORED, select_layer, "open_clip",
                            family="CLIP", shapes=mcore_shapes(arch, select_layer))  # fmt: skip


def hf_clip_state_to_mcore(
    state_dict: Mapping[str, torch.Tensor], arch: ClipVisionArch, *, select_layer: int = -2
) -> dict[str, torch.Tensor]:
    """Full (TP=1) ``CLIPViTModel`` tensors from a HF ``CLIPVisionModel`` or ``CLIPModel`` state dict."""
    state: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = key.removeprefix(HF_PREFIX)
        if name in state:
            raise NevaError(f"HF tensor {name} appears both with and without the {HF_PREFIX!r} prefix")
        state[name] = value
    return convert_to_mcore(state, arch, HF_TABLE, HF_IGNORED, select_layer, "Hugging Face", family="CLIP",
                            shapes=mcore_shapes(arch, select_layer))  # fmt: skip


def mcore_state_to_hf_clip(
    state: Mapping[str, torch.Tensor], arch: ClipVisionArch, *, select_layer: int = -1
) -> dict[str, torch.Tensor]:
    """HF ``CLIPVisionModel`` tensors (names without ``vision_model.``) from full ``CLIPViTModel`` tensors.

    The inverse of :func:`hf_clip_state_to_mcore` for the layers kept for ``select_layer`` (-1: all layers).
    ``state`` must hold exactly those tensors (a ``vision_model.`` prefix is accepted);
    missing or unknown names raise ``NevaError``.
    """
    return convert_to_hf(state, arch, HF_TABLE, select_layer, family="CLIP", shapes=mcore_shapes(arch, select_layer))


def transformer_config(
    arch: ClipVisionArch, tp: int = 1, *, select_layer: int = -2, params_dtype: torch.dtype = torch.float32
) -> TransformerConfig:
    """megatron-core's ``TransformerConfig`` of the vision encoder (``vision_model_type = "clip"`` set).

    ``num_layers`` is :meth:`ClipVisionArch.kept_layers`: the layers after ``select_layer`` are not built.
    """
    from megatron.core.transformer import TransformerConfig

    from neva_tools.model.gpt import fused_softmax_available

    if tp < 1 or arch.num_heads % tp:
        raise NevaError(f"tensor_model_parallel_size ({tp}) must divide the vision num_attention_heads "
                        f"({arch.num_heads})")  # fmt: skip
    if arch.ffn_hidden_size % tp:
        raise NevaError(f"tensor_model_parallel_size ({tp}) must divide the vision ffn_hidden_size "
                        f"({arch.ffn_hidden_size})")  # fmt: skip
    cuda = torch.cuda.is_available()
    config = TransformerConfig(
        num_layers=arch.kept_layers(select_layer),
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_heads,
        kv_channels=arch.head_dim,
        normalization="LayerNorm",
        layernorm_epsilon=arch.layernorm_epsilon,
        activation_func=ACTIVATIONS[arch.activation],
        gated_linear_unit=False,
        add_bias_linear=True,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        apply_query_key_layer_scaling=False,
        bias_activation_fusion=False,  # see the module docstring
        bias_dropout_fusion=cuda,
        masked_softmax_fusion=cuda and fused_softmax_available(),  # apex's kernels (the GPU images have them)
        persist_layer_norm=False,
        tensor_model_parallel_size=tp,
        use_cpu_initialization=not cuda,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
    )
    config.vision_model_type = "clip"  # read by LLaVAModel; not a TransformerConfig field in 0.16.1
    return config
