"""SigLIP vision towers (Hugging Face and open_clip/timm) → megatron-core ``CLIPViTModel(model_subtype="siglip")``.

What ``siglip`` means in megatron-core 0.16.1 (``models/vision/clip_vit_model.py`` and ``LLaVAModel``): no class
token (``add_class_token=False``, ``class_token_len=0``; ``LLaVAModel`` asserts ``drop_vision_class_token`` is
False), a biased patch convolution (``conv1.bias``, ``padding="valid"``), learned position embeddings for the
patches only, no ``ln_pre``, and an ``ln_post`` after the last built layer. An image becomes (size // patch)² tokens
(so400m/14 at 384: 729), all of them patches. The transformer layers are CLIP's (pre-norm, biased q/k/v/out and
fc1/fc2, bidirectional attention), so per-layer names, QKV fusion and TP split kinds are shared with
``neva_tools.mappings.clip``; SigLIP's activation is the tanh GELU (HF ``gelu_pytorch_tanh``), layer-norm eps 1e-6.

Features: as for CLIP, NeVA takes the output of transformer layer ``select_layer`` (HF ``hidden_states[select_layer]``,
``hidden_states[0]`` being the embeddings), built by keeping only the layers up to it. That output has no final
layer norm (LLaVA-NeXT/OneVision's SigLIP tower and HF ``LlavaOnevision`` use it so), so the ``ln_post`` that
megatron-core builds is removed from the model (``neva_tools.model.vision.drop_post_norm``) and HF
``post_layernorm`` / the attention-pooling ``head`` (timm ``norm`` / ``attn_pool``) are ignored. PaliGemma's and
Megatron-LM NVLM's choice, the post-normed last layer (``last_hidden_state``), is not offered.

Sources: a HF ``SiglipVisionModel`` or ``SiglipModel`` (``vision_model.`` names; text tower ignored), and open_clip's
SigLIP models (``ViT-*-SigLIP*``), whose vision tower is a timm ``VisionTransformer`` (``model.visual.trunk``; timm
is a dependency of open_clip). timm's SigLIP ViTs use exact GELU; each source's activation is read from it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from neva_tools.errors import NevaError
from neva_tools.mappings import clip
from neva_tools.mappings.base import Entry, Split
from neva_tools.mappings.clip import ACTIVATIONS, HF_ACTIVATIONS, ClipVisionArch
from neva_tools.mappings.vit import convert_to_hf, convert_to_mcore, entries

if TYPE_CHECKING:
    from megatron.core.transformer import TransformerConfig

#: HF ``model_type`` values of SigLIP vision towers (``siglip``: a whole ``SiglipModel`` with ``vision_config``).
HF_MODEL_TYPES = ("siglip", "siglip_vision_model")

_M = "decoder.layers.{i}."
_T = "blocks.{i}."

#: HF ``SiglipVisionModel`` (names without ``vision_model.``) → ``CLIPViTModel``; the encoder layers are named and
#: laid out exactly as CLIP's, so their entries are CLIP's.
HF_TABLE: tuple[Entry, ...] = (
    Entry("conv1.weight", ("embeddings.patch_embedding.weight",), Split.REPLICATED),
    Entry("conv1.bias", ("embeddings.patch_embedding.bias",), Split.REPLICATED),
    Entry("position_embeddings.weight", ("embeddings.position_embedding.weight",), Split.REPLICATED),
    *(entry for entry in clip.HF_TABLE if entry.per_layer),
)

#: timm ``VisionTransformer`` (open_clip ``model.visual.trunk``) → ``CLIPViTModel``. ``qkv`` is ``[q; k; v]``.
TIMM_TABLE: tuple[Entry, ...] = (
    Entry("conv1.weight", ("patch_embed.proj.weight",), Split.REPLICATED),
    Entry("conv1.bias", ("patch_embed.proj.bias",), Split.REPLICATED),
    Entry("position_embeddings.weight", ("pos_embed",), Split.REPLICATED),  # [1, patches, h] → [patches, h]
    Entry(_M + "input_layernorm.weight", (_T + "norm1.weight",), Split.REPLICATED),
    Entry(_M + "input_layernorm.bias", (_T + "norm1.bias",), Split.REPLICATED),
    Entry(_M + "self_attention.linear_qkv.weight", (_T + "attn.qkv.weight",), Split.QKV),
    Entry(_M + "self_attention.linear_qkv.bias", (_T + "attn.qkv.bias",), Split.QKV),
    Entry(_M + "self_attention.linear_proj.weight", (_T + "attn.proj.weight",), Split.ROW),
    Entry(_M + "self_attention.linear_proj.bias", (_T + "attn.proj.bias",), Split.REPLICATED),
    Entry(_M + "pre_mlp_layernorm.weight", (_T + "norm2.weight",), Split.REPLICATED),
    Entry(_M + "pre_mlp_layernorm.bias", (_T + "norm2.bias",), Split.REPLICATED),
    Entry(_M + "mlp.linear_fc1.weight", (_T + "mlp.fc1.weight",), Split.COLUMN),
    Entry(_M + "mlp.linear_fc1.bias", (_T + "mlp.fc1.bias",), Split.COLUMN),
    Entry(_M + "mlp.linear_fc2.weight", (_T + "mlp.fc2.weight",), Split.ROW),
    Entry(_M + "mlp.linear_fc2.bias", (_T + "mlp.fc2.bias",), Split.REPLICATED),
)

#: HF tensors not used by layer features: the final norm, the attention-pooling head, the ``position_ids`` buffer of
#: old checkpoints, and a whole ``SiglipModel``'s text tower, ``logit_scale`` and ``logit_bias``.
HF_IGNORED = ("post_layernorm.", "head.", "embeddings.position_ids", "text_model.", "logit_scale", "logit_bias")
#: timm tensors after the transformer (final norm, attention pooling, classifier), not used by layer features.
TIMM_IGNORED = ("norm.", "fc_norm.", "attn_pool.", "head.")
#: Prefixes of the timm trunk inside a whole open_clip model or its ``visual`` tower.
TIMM_PREFIXES = ("visual.trunk.", "trunk.")


def _square(value: Any, key: str, source: str) -> int:
    """A square size from a HF config value (an int or a ``[h, w]`` pair)."""
    if isinstance(value, list | tuple):
        if len(value) != 2 or value[0] != value[1]:
            raise NevaError(f"{source}: {key} {value} is not square; only square images and patches are supported")
        value = value[0]
    return int(value)


def _block_problem(block: torch.nn.Module) -> str | None:
    """What in a timm ViT block ``CLIPViTModel`` cannot express, or None."""
    from timm.layers import Attention, Mlp
    from timm.models.vision_transformer import Block

    if type(block) is not Block or type(block.attn) is not Attention or type(block.mlp) is not Mlp:
        return (f"{type(block).__name__} blocks with {type(block.attn).__name__} and {type(block.mlp).__name__} "
                "(timm Block with Attention and Mlp only)")  # fmt: skip
    extras = (block.ls1, block.ls2, block.attn.q_norm, block.attn.k_norm, block.attn.norm, block.mlp.norm)
    if not all(isinstance(m, torch.nn.Identity) for m in extras):
        return "LayerScale, qk_norm or scale_*_norm"
    if block.attn.qkv.bias is None or block.attn.proj.bias is None:
        return "attention without biases"
    return None


@dataclass(frozen=True)
class SiglipVisionArch(ClipVisionArch):
    """The architecture of a SigLIP ViT vision tower (no class token, ``ln_post``); SigLIP's defaults."""

    layernorm_epsilon: float = 1e-6
    activation: str = "gelu_tanh"

    def __post_init__(self) -> None:
        # Unlike CLIP's, the image size need not be a multiple of the patch size: the "valid" patch convolution
        # drops the remainder (so400m/14 at 384 px: 27 x 27 = 729 patches covering 378 px). See covered_size.
        if self.image_size < self.patch_size:
            raise NevaError(f"image size ({self.image_size}) must be at least the patch size ({self.patch_size})")
        if self.hidden_size % self.num_heads:
            raise NevaError(f"hidden size ({self.hidden_size}) must be divisible by the heads ({self.num_heads})")
        if self.activation not in ACTIVATIONS:
            raise NevaError(f"activation {self.activation!r} is not supported; supported: {', '.join(ACTIVATIONS)}")

    @property
    def covered_size(self) -> int:
        """The pixels the patches cover (``image_size`` rounded down to whole patches): megatron-core's ``img_h``.

        ``CLIPViTModel`` asserts ``img_h % patch_dim == 0``; fed ``image_size`` images, its convolution makes the
        same (image_size // patch_size)² patches as HF's and timm's.
        """
        return self.patch_size * (self.image_size // self.patch_size)

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], source: str = "config.json") -> SiglipVisionArch:
        """Read a HF ``SiglipVisionConfig`` dict (or a ``SiglipConfig`` dict: its ``vision_config``).

        Absent keys take ``transformers.SiglipVisionConfig``'s defaults.
        """
        if cfg.get("model_type") not in (None, *HF_MODEL_TYPES):
            raise NevaError(f"{source}: model_type {cfg['model_type']!r} is not a SigLIP vision model; supported: "
                            f"{', '.join(HF_MODEL_TYPES)}")  # fmt: skip
        if cfg.get("model_type") == "siglip" or "vision_config" in cfg:
            cfg = cfg.get("vision_config") or {}
        hidden_act = cfg.get("hidden_act", "gelu_pytorch_tanh")
        if hidden_act not in HF_ACTIVATIONS:
            raise NevaError(f"{source}: hidden_act {hidden_act!r} is not supported; supported: "
                            f"{', '.join(HF_ACTIVATIONS)}")  # fmt: skip
        if int(cfg.get("num_channels", 3)) != 3:
            raise NevaError(f"{source}: num_channels {cfg['num_channels']} is not supported; NeVA images are RGB (3)")
        return cls(
            image_size=_square(cfg.get("image_size", 224), "image_size", source),
            patch_size=_square(cfg.get("patch_size", 16), "patch_size", source),
            hidden_size=int(cfg.get("hidden_size", 768)),
            num_layers=int(cfg.get("num_hidden_layers", 12)),
            num_heads=int(cfg.get("num_attention_heads", 12)),
            ffn_hidden_size=int(cfg.get("intermediate_size", 3072)),
            layernorm_epsilon=float(cfg.get("layer_norm_eps", 1e-6)),
            activation=HF_ACTIVATIONS[hidden_act],
        )

    @classmethod
    def from_open_clip(cls, visual: torch.nn.Module) -> SiglipVisionArch:
        """Read an open_clip SigLIP vision tower (a ``TimmModel``; see :meth:`from_timm`)."""
        from open_clip.timm_model import TimmModel

        if not isinstance(visual, TimmModel):
            raise NevaError(f"the open_clip vision tower is a {type(visual).__name__}, not a timm (SigLIP) ViT")
        return cls.from_timm(visual.trunk)

    @classmethod
    def from_timm(cls, trunk: torch.nn.Module) -> SiglipVisionArch:
        """Read a timm SigLIP ``VisionTransformer``; variants ``CLIPViTModel`` cannot express raise ``NevaError``."""
        from timm.layers import GELUTanh, QuickGELU
        from timm.models.vision_transformer import VisionTransformer

        name = type(trunk).__name__
        if not isinstance(trunk, VisionTransformer):
            raise NevaError(f"the timm vision tower is a {name}, not a ViT (VisionTransformer)")
        problems = []
        if trunk.num_prefix_tokens:
            problems.append(f"{trunk.num_prefix_tokens} class/register tokens (SigLIP has none)")
        if trunk.pos_embed is None or trunk.dynamic_img_size:
            problems.append("no learned fixed-size position embedding")
        if not all(isinstance(m, torch.nn.Identity) for m in (trunk.norm_pre, trunk.patch_embed.norm)):
            problems.append("a pre-transformer norm")
        if trunk.patch_embed.proj.bias is None:
            problems.append("an unbiased patch embedding")
        blocks = list(trunk.blocks)
        problems += sorted({p for p in map(_block_problem, blocks) if p})
        (height, width), (patch_h, patch_w) = trunk.patch_embed.img_size, trunk.patch_embed.patch_size
        if height != width or patch_h != patch_w:
            problems.append(f"non-square images {trunk.patch_embed.img_size} or patches {trunk.patch_embed.patch_size}")
        if problems:
            raise NevaError(f"the timm {name} is not a SigLIP ViT that megatron-core's CLIPViTModel (siglip) can run: "
                            f"{'; '.join(problems)}")  # fmt: skip
        act = blocks[0].mlp.act
        if isinstance(act, GELUTanh) or (isinstance(act, torch.nn.GELU) and act.approximate == "tanh"):
            activation = "gelu_tanh"
        elif isinstance(act, QuickGELU):
            activation = "quick_gelu"
        elif isinstance(act, torch.nn.GELU) or type(act).__name__ == "GELU":  # torch's or timm's exact GELU
            activation = "gelu"
        else:
            raise NevaError(f"timm activation {type(act).__name__} is not supported")
        return cls(
            image_size=int(height),
            patch_size=int(patch_h),
            hidden_size=int(trunk.embed_dim),
            num_layers=len(blocks),
            num_heads=int(blocks[0].attn.num_heads),
            ffn_hidden_size=int(blocks[0].mlp.fc1.out_features),
            layernorm_epsilon=float(blocks[0].norm1.eps),
            activation=activation,
        )

    def to_hf_config(self) -> dict[str, Any]:
        """The HF ``SiglipVisionConfig`` dict of this tower (no pooling head: NeVA does not use it)."""
        return {**super().to_hf_config(), "model_type": "siglip_vision_model", "vision_use_head": False}

    def replace(self, **changes: Any) -> SiglipVisionArch:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def is_siglip_hf_config(cfg: Mapping[str, Any]) -> bool:
    """True when a HF ``config.json`` dict describes a SigLIP model or vision tower."""
    vision = cfg.get("vision_config") or {}
    return cfg.get("model_type") in HF_MODEL_TYPES or vision.get("model_type") == "siglip_vision_model"


def hf_vision_arch(cfg: Mapping[str, Any], source: str = "config.json") -> ClipVisionArch:
    """The architecture of a HF CLIP or SigLIP ``config.json`` dict (a :class:`SiglipVisionArch` for SigLIP)."""
    if is_siglip_hf_config(cfg):
        return SiglipVisionArch.from_hf_config(cfg, source)
    if cfg.get("model_type") not in (None, "clip", "clip_vision_model"):
        raise NevaError(f"{source}: model_type {cfg['model_type']!r} is not a CLIP or SigLIP vision model; supported: "
                        f"clip, clip_vision_model, {', '.join(HF_MODEL_TYPES)}")  # fmt: skip
    return ClipVisionArch.from_hf_config(cfg, source)


def open_clip_vision_arch(visual: torch.nn.Module) -> ClipVisionArch:
    """The architecture of an open_clip vision tower: a timm ViT (the SigLIP models) or a CLIP ``VisionTransformer``."""
    from open_clip.timm_model import TimmModel

    if isinstance(visual, TimmModel):
        return SiglipVisionArch.from_open_clip(visual)
    return ClipVisionArch.from_open_clip(visual)


def vision_model_type(arch: ClipVisionArch) -> str:
    """megatron-core's ``vision_model_type`` / ``CLIPViTModel`` ``model_subtype`` of ``arch``."""
    return "siglip" if isinstance(arch, SiglipVisionArch) else "clip"


def mcore_shapes(arch: SiglipVisionArch, select_layer: int = -2) -> dict[str, tuple[int, ...]]:
    """The full (TP=1) shape of every tensor of the siglip ``CLIPViTModel`` (``ln_post`` removed)."""
    shapes = clip.mcore_shapes(arch, select_layer)  # the layers are CLIP's
    for name in ("class_token", "ln_pre.weight", "ln_pre.bias"):
        del shapes[name]
    shapes["conv1.bias"] = (arch.hidden_size,)
    shapes["position_embeddings.weight"] = (arch.num_patches, arch.hidden_size)
    return shapes


def mcore_splits(arch: SiglipVisionArch, select_layer: int = -2) -> dict[str, Split]:
    """siglip ``CLIPViTModel`` tensor name → its tensor-parallel split kind."""
    return {name: split for name, _, split in entries(HF_TABLE, arch, select_layer)}


def _convert(state: Mapping[str, torch.Tensor], arch: SiglipVisionArch, table: tuple[Entry, ...],
             ignored: tuple[str, ...], select_layer: int, kind: str) -> dict[str, torch.Tensor]:  # fmt: skip
    return convert_to_mcore(state, arch, table, ignored, select_layer, kind, family="SigLIP",
                                 shapes=mcore_shapes(arch, select_layer))  # fmt: skip


def hf_siglip_state_to_mcore(
    state_dict: Mapping[str, torch.Tensor], arch: SiglipVisionArch, *, select_layer: int = -2
) -> dict[str, torch.Tensor]:
    """Full (TP=1) siglip ``CLIPViTModel`` tensors from a HF ``SiglipVisionModel`` or ``SiglipModel`` state dict."""
    state: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = key.removeprefix(clip.HF_PREFIX)
        if name in state:
            raise NevaError(f"HF tensor {name} appears both with and without the {clip.HF_PREFIX!r} prefix")
        state[name] = value
    return _convert(state, arch, HF_TABLE, HF_IGNORED, select_layer, "Hugging Face SigLIP")


def timm_siglip_state_to_mcore(
    state_dict: Mapping[str, torch.Tensor], arch: SiglipVisionArch, *, select_layer: int = -2
) -> dict[str, torch.Tensor]:
    """Full (TP=1) siglip ``CLIPViTModel`` tensors from a timm SigLIP ViT state dict.

    Also accepts open_clip's ``model.visual.state_dict()`` (``trunk.*``; its ``head`` is ignored) and a whole
    open_clip model's (``visual.trunk.*``; the text tower is ignored).
    """
    for prefix in TIMM_PREFIXES:
        if any(k.startswith(prefix) for k in state_dict):
            state_dict = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
            break
    return _convert(state_dict, arch, TIMM_TABLE, TIMM_IGNORED, select_layer, "open_clip/timm SigLIP")


def mcore_state_to_hf_siglip(
    state: Mapping[str, torch.Tensor], arch: SiglipVisionArch, *, select_layer: int = -1
) -> dict[str, torch.Tensor]:
    """HF ``SiglipVisionModel`` tensors (no ``vision_model.`` prefix) from full siglip ``CLIPViTModel`` tensors.

    The inverse of :func:`hf_siglip_state_to_mcore` for the layers kept for ``select_layer`` (-1: all layers); the
    unused ``post_layernorm`` and ``head`` are not produced. Missing or unknown names raise ``NevaError``.
    """
    return convert_to_hf(state, arch, HF_TABLE, select_layer, family="SigLIP",
                              shapes=mcore_shapes(arch, select_layer))  # fmt: skip


def transformer_config(
    arch: SiglipVisionArch, tp: int = 1, *, select_layer: int = -2, params_dtype: torch.dtype = torch.float32
) -> TransformerConfig:
    """megatron-core's ``TransformerConfig`` of the SigLIP encoder (CLIP's, with ``vision_model_type = "siglip"``)."""
    config = clip.transformer_config(arch, tp, select_layer=select_layer, params_dtype=params_dtype)
    config.vision_model_type = "siglip"
    return config
