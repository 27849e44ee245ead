"""CLIP and SigLIP vision encoders as megatron-core ``CLIPViTModel``: build, load (open_clip or Hugging Face), run.

The model is built exactly as ``LLaVAModel`` builds its ``vision_model`` (``model_subtype="clip"``, one class
token, ``ln_pre`` and no ``ln_post``), from :func:`neva_tools.mappings.clip.transformer_config`, so its state dict
plugs into ``LLaVAModel`` under ``vision_model.``. Feature-layer selection is done by building only the layers up
to ``select_layer`` (see ``neva_tools.mappings.clip``); ``LLaVAModel`` then drops the class token.
SigLIP towers (``neva_tools.mappings.siglip``) are the same model with ``model_subtype="siglip"`` (no class token,
biased ``conv1``, no ``ln_pre``) and its ``ln_post`` removed (:func:`drop_post_norm`). The architecture's type
(:class:`~neva_tools.mappings.siglip.SiglipVisionArch` or ``ClipVisionArch``) and the ``kind`` returned by
:func:`read_clip_vision` pick the tables: use :func:`vision_state_to_mcore`, :func:`vision_splits` and
:func:`vision_transformer_config` rather than the per-family functions.

Layer spec: :func:`vit_layer_spec`, not megatron-core's ``get_vit_layer_with_local_spec``: in 0.16.1 the latter
builds causal self-attention (``AttnMaskType.causal``; Megatron-LM issue 1791, fixed after 0.16.1 by PR 4395), and
``LLaVAModel`` calls the ViT with ``attention_mask=None``, so every patch would only see the patches before it.
CLIP attention is bidirectional; pass :func:`vit_layer_spec` as ``LLaVAModel``'s ``vision_transformer_layer_spec``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from neva_tools.checkpoint.tp import shard
from neva_tools.errors import NevaError
from neva_tools.mappings import clip, siglip
from neva_tools.mappings.base import Split
from neva_tools.mappings.clip import HF_IGNORED, HF_PREFIX, ClipVisionArch

if TYPE_CHECKING:
    from megatron.core.models.vision.clip_vit_model import CLIPViTModel
    from megatron.core.transformer.spec_utils import ModuleSpec

logger = logging.getLogger(__name__)

_OPEN_CLIP_WEIGHTS = ("*.safetensors", "*.bin", "*.pth", "*.pt")

#: ``kind`` of :func:`read_clip_vision` → the converter of its tensors to full ``CLIPViTModel`` tensors.
CONVERTERS = {
    "hf": clip.hf_clip_state_to_mcore,
    "open_clip": clip.open_clip_state_to_mcore,
    "hf_siglip": siglip.hf_siglip_state_to_mcore,
    "open_clip_siglip": siglip.timm_siglip_state_to_mcore,
}


def vision_state_to_mcore(
    state: Mapping[str, torch.Tensor], arch: ClipVisionArch, kind: str, *, select_layer: int = -2
) -> dict[str, torch.Tensor]:
    """Full (TP=1) ``CLIPViTModel`` tensors from what :func:`read_clip_vision` returned (CLIP or SigLIP)."""
    if kind not in CONVERTERS:
        raise NevaError(f"unknown vision checkpoint kind {kind!r}; known: {', '.join(CONVERTERS)}")
    if kind.endswith("_siglip") != isinstance(arch, siglip.SiglipVisionArch):
        raise NevaError(f"vision checkpoint kind {kind!r} does not fit a {type(arch).__name__}")
    return CONVERTERS[kind](state, arch, select_layer=select_layer)


def vision_splits(arch: ClipVisionArch, select_layer: int = -2) -> dict[str, Split]:
    """``CLIPViTModel`` tensor name → its tensor-parallel split kind, for a CLIP or SigLIP ``arch``."""
    family = siglip if isinstance(arch, siglip.SiglipVisionArch) else clip
    return family.mcore_splits(arch, select_layer)


def vision_transformer_config(
    arch: ClipVisionArch, tp: int = 1, *, select_layer: int = -2, params_dtype: torch.dtype = torch.float32
) -> Any:
    """megatron-core's ``TransformerConfig`` of a CLIP or SigLIP encoder, ``vision_model_type`` set."""
    family = siglip if isinstance(arch, siglip.SiglipVisionArch) else clip
    return family.transformer_config(arch, tp, select_layer=select_layer, params_dtype=params_dtype)


def drop_post_norm(vit: CLIPViTModel) -> None:
    """Remove the ``ln_post`` megatron-core builds for ``model_subtype="siglip"``.

    NeVA's features are the output of layer ``select_layer`` without a final norm (``neva_tools.mappings.siglip``);
    ``CLIPViTModel.forward`` skips a ``None`` ``ln_post``, and its tensors leave the state dict.
    """
    vit.ln_post = None


def vit_layer_spec() -> ModuleSpec:
    """megatron-core's local (no Transformer Engine) ViT layer spec with bidirectional SDPA self-attention."""
    from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec
    from megatron.core.transformer.enums import AttnMaskType

    from neva_tools.model.attention import use_sdpa

    spec = get_vit_layer_with_local_spec()  # a fresh object on every call
    attention = spec.submodules.self_attention
    attention.params = {**attention.params, "attn_mask_type": AttnMaskType.no_mask}
    return use_sdpa(spec)


def build_clip_vit(
    arch: ClipVisionArch, *, select_layer: int = -2, params_dtype: torch.dtype = torch.float32
) -> CLIPViTModel:
    """A randomly initialized ``CLIPViTModel`` (CLIP or SigLIP ``arch``) for this process's tensor-parallel rank.

    The TP size comes from megatron's parallel state (``neva_tools.model.parallel.init_distributed``).
    """
    from megatron.core import parallel_state
    from megatron.core.models.vision import clip_vit_model
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from neva_tools.model.cpu_compat import apply_cpu_compat

    if not parallel_state.model_parallel_is_initialized():
        raise NevaError("megatron parallel state is not initialized; call neva_tools.model.parallel.init_distributed()")
    apply_cpu_compat()  # CLIPViTModel calls .cuda() in __init__ (a no-op when CUDA is available)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    config = vision_transformer_config(arch, tp, select_layer=select_layer, params_dtype=params_dtype)
    # Without Transformer Engine the default norm is torch.nn.LayerNorm, which build_module cannot construct.
    norm: Any = WrappedTorchNorm if clip_vit_model.NORM_IMPL is torch.nn.LayerNorm else clip_vit_model.NORM_IMPL
    subtype = config.vision_model_type
    covered = arch.patch_size * (arch.image_size // arch.patch_size)  # SigLIP may leave a remainder (384/14 → 378)
    model = clip_vit_model.CLIPViTModel(
        config,
        vit_layer_spec(),
        ln_pre_impl=norm,
        ln_post_impl=norm,
        add_class_token=subtype == "clip",
        class_token_len=int(subtype == "clip"),  # as LLaVAModel builds it
        patch_dim=arch.patch_size,
        img_h=covered,
        img_w=covered,
        model_subtype=subtype,
    )
    if subtype == "siglip":
        drop_post_norm(model)
    return model


def vision_features(model: CLIPViTModel, images: torch.Tensor) -> torch.Tensor:
    """Features ``[b, patches, hidden]`` of ``images`` ``[b, 3, H, W]``, any class token dropped (as ``LLaVAModel``)."""
    return model(images)[:, model.class_token_len :, :]


def load_mcore_state(model: CLIPViTModel, full: Mapping[str, torch.Tensor], splits: Mapping[str, Any]) -> None:
    """Load full (TP=1) tensors into ``model``, each sharded for this process's tensor-parallel rank."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    own = model.state_dict()
    wanted = {k for k in own if not k.endswith("_extra_state")}
    if wanted != set(full):
        raise NevaError(f"converted vision tensors do not match the model: missing {sorted(wanted - set(full))}, "
                        f"unexpected {sorted(set(full) - wanted)}")  # fmt: skip
    state = dict(own)
    for name, tensor in full.items():
        part = shard(tensor, splits[name], tp, rank)
        if part.shape != own[name].shape:
            raise NevaError(f"{name}: TP rank {rank} of {tp} gets shape {tuple(part.shape)}, the model has "
                            f"{tuple(own[name].shape)}")  # fmt: skip
        state[name] = part
    model.load_state_dict(state, strict=True)


def read_clip_vision(
    source: str | Path, *, pretrained: str | Path | None = None
) -> tuple[dict[str, torch.Tensor], ClipVisionArch, str]:
    """The vision tensors, architecture and kind (a key of :data:`CONVERTERS`) of a local CLIP or SigLIP checkpoint.

    ``source`` is one of
      * a Hugging Face ``CLIPVisionModel``/``CLIPModel`` or ``SiglipVisionModel``/``SiglipModel`` directory
        (``config.json`` + weights; read as tensors, no model code is run, so ``trust_remote_code`` never applies);
        kind ``"hf"`` or ``"hf_siglip"`` (``config.json`` ``model_type`` ``siglip`` / ``siglip_vision_model``);
      * an open_clip directory (``open_clip_config.json`` + one weights file, open_clip's ``local-dir:`` layout);
      * an open_clip model name (``open_clip.list_models()``, e.g. ``ViT-L-14-336-quickgelu`` for OpenAI weights,
        ``ViT-SO400M-14-SigLIP-384`` for SigLIP) with ``pretrained`` a local checkpoint file.
    open_clip towers are kind ``"open_clip"``, or ``"open_clip_siglip"`` for timm ViTs (the SigLIP models).
    A SigLIP architecture is a :class:`~neva_tools.mappings.siglip.SiglipVisionArch`.
    Nothing is downloaded: hub names and pretrained tags are refused.
    """
    path = Path(source)
    if path.is_dir() and (path / "config.json").is_file():
        return _read_hf(path)
    if path.is_dir() and (path / "open_clip_config.json").is_file():
        if not any(any(path.glob(pattern)) for pattern in _OPEN_CLIP_WEIGHTS):
            raise NevaError(
                f"{path} has an open_clip_config.json but no weights file ({', '.join(_OPEN_CLIP_WEIGHTS)})"
            )
        if pretrained is not None:
            raise NevaError(f"{path} is an open_clip directory with its own weights; do not pass pretrained")
        return _read_open_clip(f"local-dir:{path}", None)
    name = str(source)
    if path.exists() or name.startswith(("hf-hub:", "local-dir:")):
        raise NevaError(
            f"{name} is not a Hugging Face CLIP directory (config.json, CLIP or SigLIP), an open_clip directory "
            "(open_clip_config.json) or an open_clip model name; download hub models first and pass the directory"
        )
    if pretrained is None or not Path(pretrained).is_file():
        raise NevaError(f"open_clip model {name} needs pretrained=<local checkpoint file>, found {pretrained!r} "
                        "(pretrained tags would download)")  # fmt: skip
    return _read_open_clip(name, str(pretrained))


def _read_hf(path: Path) -> tuple[dict[str, torch.Tensor], ClipVisionArch, str]:
    from neva_tools.checkpoint.hf_reader import HFCheckpoint

    config = json.loads((path / "config.json").read_text())
    arch = siglip.hf_vision_arch(config, source=str(path / "config.json"))
    is_siglip = isinstance(arch, siglip.SiglipVisionArch)
    kind, ignored = ("hf_siglip", siglip.HF_IGNORED) if is_siglip else ("hf", HF_IGNORED)
    with HFCheckpoint(path) as ckpt:
        names = [n for n in ckpt.names() if not n.removeprefix(HF_PREFIX).startswith(ignored)]
        state = {n: ckpt.get(n) for n in names}
    return state, arch, kind


def _read_open_clip(name: str, pretrained: str | None) -> tuple[dict[str, torch.Tensor], ClipVisionArch, str]:
    import open_clip

    try:
        with torch.device("cpu"):  # built and filled in CPU memory whatever the default device (cuda, meta)
            model = open_clip.create_model(name, pretrained=pretrained, device="cpu", weights_only=True)
    except (RuntimeError, ValueError, FileNotFoundError, KeyError) as exc:
        raise NevaError(f"open_clip could not build {name} from {pretrained or name}: {exc}") from None
    visual = model.visual
    arch = siglip.open_clip_vision_arch(visual)
    if isinstance(arch, siglip.SiglipVisionArch):  # open_clip's SigLIP models: a timm ViT trunk (+ an unused head)
        return dict(visual.trunk.state_dict()), arch, "open_clip_siglip"
    return dict(visual.state_dict()), arch, "open_clip"


def load_clip_vision(
    source: str | Path,
    *,
    pretrained: str | Path | None = None,
    select_layer: int = -2,
    params_dtype: torch.dtype = torch.float32,
) -> tuple[CLIPViTModel, ClipVisionArch]:
    """A ``CLIPViTModel`` with the converted weights of a local CLIP/SigLIP checkpoint (see :func:`read_clip_vision`).

    Only the layers up to ``select_layer`` are built; this TP rank's shard is loaded. Needs megatron's
    parallel state (``neva_tools.model.parallel.init_distributed``).
    """
    state, arch, kind = read_clip_vision(source, pretrained=pretrained)
    full = vision_state_to_mcore(state, arch, kind, select_layer=select_layer)
    del state
    model = build_clip_vit(arch, select_layer=select_layer, params_dtype=params_dtype)
    load_mcore_state(model, full, vision_splits(arch, select_layer))
    logger.info(
        "loaded %s %s vision encoder %s: %d of %d layers (select_layer %d), %dx%d images, patch %d",
        kind, siglip.vision_model_type(arch), source, arch.kept_layers(select_layer), arch.num_layers, select_layer,
        arch.image_size, arch.image_size, arch.patch_size,
    )  # fmt: skip
    return model, arch
