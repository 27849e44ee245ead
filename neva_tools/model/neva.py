"""NeVA on megatron-core: ``LLaVAModel`` = CLIP/SigLIP ``CLIPViTModel`` + ``MultimodalProjector`` + ``GPTModel``.

Everything architectural is derived: the LLM from its NeMo model section (the ``.nemo``), the vision
encoder from its own config (see ``neva_tools.mappings.clip`` and ``.siglip``), the projector from both hidden
sizes, the image token count from image and patch size (no class token in either: CLIP's is dropped). With an
``image_layout`` (:mod:`neva_tools.data.anyres`) the model lays out AnyRes tiles (:mod:`neva_tools.model.merge`);
``mm_patch_merge_type: spatial_unpad`` adds the learned ``vision_projection.image_newline`` row.
Only local (non-Transformer-Engine) specs are used so the same model runs on CPU (tests, demo) and GPU.

Pipeline parallelism (the LLM config's ``pipeline_model_parallel_size``, optionally
``virtual_pipeline_model_parallel_size``): each rank builds its stage as megatron-core's ``LLaVAModel`` places it:
the vision encoder and the projector (``add_encoder``) with the LLM's embedding (``pre_process``) on the first stage
(its first chunk), the output layer (``post_process``) on the last, the LLM's layers split by megatron-core's layer
offsets; every stage gets the batch (the last one computes the image-expanded labels and loss mask from it).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from neva_tools.data.anyres import ImageLayout
from neva_tools.errors import NevaError
from neva_tools.model.gpt import gpt_model_kwargs, transformer_config_from_nemo

PROJECTOR_TYPES = {"mlp2x_gelu": "mlp", "linear": "affine"}
NEWLINE_SEED = 1234  # image_newline's initialisation: the same on every rank, whatever the RNG state


@dataclass(frozen=True)
class NevaParts:
    """What a NeVA model is made of (all sizes derived, none typed by hand)."""

    llm_cfg: dict[str, Any]
    padded_vocab_size: int
    vision_config: Any  # megatron-core TransformerConfig with ``vision_model_type`` set
    image_size: int
    patch_size: int
    projector_type: str = "mlp2x_gelu"
    image_layout: ImageLayout | None = None  # AnyRes tiles and mm_patch_merge_type (None: one tile, flat)

    @property
    def image_tokens(self) -> int:
        """Embeddings one image becomes in the LLM input (class token dropped)."""
        return (self.image_size // self.patch_size) ** 2


def projector_config(language: Any, projector_type: str) -> Any:
    """The projector's TransformerConfig: Linear(vision → LLM hidden) [→ GELU → Linear(LLM → LLM hidden)], biased."""
    if projector_type not in PROJECTOR_TYPES:
        raise NevaError(f"mm_cfg.mm_mlp_adapter_type {projector_type!r} is not one of {', '.join(PROJECTOR_TYPES)}")
    return dataclasses.replace(
        language,
        num_layers=1,
        pipeline_model_parallel_size=1,  # the projector lives on one stage (the first)
        virtual_pipeline_model_parallel_size=None,
        ffn_hidden_size=language.hidden_size,
        gated_linear_unit=False,
        add_bias_linear=True,
        activation_func=torch.nn.functional.gelu,
        bias_activation_fusion=False,
    )


def build_neva_model(parts: NevaParts, *, supervised_logits: bool = True, vp_stage: int | None = None) -> Any:
    """A megatron-core ``LLaVAModel`` for the running TP group (and pipeline stage, or its interleaved chunk
    ``vp_stage``), built from ``parts`` (weights random).

    ``supervised_logits``: in training, logits and cross-entropy only at labelled positions
    (:mod:`neva_tools.model.supervised_logits`; off only to measure what it saves).
    """
    from megatron.core import parallel_state
    from megatron.core.enums import ModelType
    from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec

    from neva_tools.model.gpt import stage_flags
    from neva_tools.model.merge import NevaLLaVAModel
    from neva_tools.model.specs import gpt_block_spec
    from neva_tools.model.supervised_logits import supervised_logits_only
    from neva_tools.model.vision import drop_post_norm, vit_layer_spec

    siglip = parts.vision_config.vision_model_type == "siglip"  # no class token to drop (LLaVAModel asserts so)
    if parts.image_size % parts.patch_size and not siglip:
        raise NevaError(f"image size ({parts.image_size}) must be a multiple of the patch size ({parts.patch_size})")
    # megatron-core wants whole patches; SigLIP's "valid" convolution drops the remainder (so400m/14: 384 → 378 px).
    covered = parts.patch_size * (parts.image_size // parts.patch_size)
    language = transformer_config_from_nemo(parts.llm_cfg)
    kwargs = gpt_model_kwargs(parts.llm_cfg)
    if kwargs["position_embedding_type"] != "rope":
        raise NevaError("NeVA needs a RoPE LLM (position_embedding_type: rope)")
    tp = language.tensor_model_parallel_size
    for name, value in (("vision num_attention_heads", parts.vision_config.num_attention_heads),):
        if value % tp:
            raise NevaError(f"tensor_model_parallel_size ({tp}) must divide the {name} ({value})")
    projection = projector_config(language, parts.projector_type)
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if language.pipeline_model_parallel_size != pp:
        raise NevaError(f"the LLM config's pipeline_model_parallel_size ({language.pipeline_model_parallel_size}) "
                        f"differs from the running pipeline size ({pp})")  # fmt: skip
    first, last = stage_flags(vp_stage)
    model = NevaLLaVAModel(
        language_transformer_config=language,
        language_transformer_layer_spec=gpt_block_spec(language),
        language_vocab_size=parts.padded_vocab_size,
        language_max_sequence_length=kwargs["max_sequence_length"],
        vision_transformer_config=parts.vision_config,
        vision_transformer_layer_spec=vit_layer_spec(),  # bidirectional attention, as CLIP and SigLIP
        drop_vision_class_token=not siglip,
        vision_projection_config=projection,
        vision_projection_layer_spec=get_mlp_module_spec(use_te=False).submodules,
        vision_projection_type=PROJECTOR_TYPES[parts.projector_type],
        parallel_output=True,
        share_embeddings_and_output_weights=kwargs["share_embeddings_and_output_weights"],
        language_position_embedding_type="rope",
        language_rotary_percent=kwargs["rotary_percent"],
        language_rotary_base=kwargs["rotary_base"],
        language_rope_scaling=kwargs["rope_scaling"],
        language_rope_scaling_factor=kwargs["rope_scaling_factor"],
        img_h=covered,
        img_w=covered,
        patch_dim=parts.patch_size,
        pre_process=first,
        post_process=last,
        add_encoder=first,  # the vision encoder and projector on the first stage
        add_decoder=True,
        vp_stage=vp_stage,
    )
    model.model_type = ModelType.encoder_or_decoder  # what megatron-core's schedules read (as its get_model sets)
    if supervised_logits and last:
        supervised_logits_only(model.language_model)  # image and prompt positions get no logits in training
    if siglip and first:
        drop_post_norm(model.vision_model)  # features are layer outputs without a final norm, as for CLIP
    if kwargs.get("seq_len_interpolation_factor"):
        model.language_model.rotary_pos_emb.seq_len_interpolation_factor = kwargs["seq_len_interpolation_factor"]
    if model.img_seq_len != parts.image_tokens:
        raise NevaError(f"megatron-core counts {model.img_seq_len} image tokens, expected {parts.image_tokens}")
    layout = parts.image_layout
    if layout is not None:
        if (layout.image_size, layout.patch_size) != (parts.image_size, parts.patch_size):
            raise NevaError(f"the image layout's {layout.image_size}px / {layout.patch_size}px tiles differ from the "
                            f"vision encoder's {parts.image_size}px / {parts.patch_size}px")  # fmt: skip
        model.image_layout = layout
        if layout.merge == "spatial_unpad" and first:
            add_image_newline(model.vision_projection, language.hidden_size)
    return model


def add_image_newline(projector: torch.nn.Module, hidden: int) -> None:
    """Give the projector LLaVA-NeXT's ``image_newline`` ``[hidden]``: N(0, 1/hidden), seeded (``NEWLINE_SEED``) so
    every tensor-parallel rank holds the same row; it is replicated and trained with the projector."""
    reference = next(projector.parameters())
    value = torch.randn(hidden, generator=torch.Generator().manual_seed(NEWLINE_SEED)) / math.sqrt(hidden)
    projector.register_parameter("image_newline", torch.nn.Parameter(value.to(reference.device, reference.dtype)))


def freeze(model: Any, *, llm: bool, vision: bool, projector: bool = False) -> None:
    """Stage settings: ``mm_cfg.llm.freeze``, ``mm_cfg.vision_encoder.freeze`` and ``mm_cfg.freeze_mm_mlp_adapter``
    (frozen parameters get ``requires_grad=False``, hence no gradient and no optimizer state); all three frozen is an
    error: nothing would train."""
    if llm and vision and projector:
        raise NevaError("model.mm_cfg.llm.freeze, model.mm_cfg.vision_encoder.freeze and "
                        "model.mm_cfg.freeze_mm_mlp_adapter are all true: nothing would train; unfreeze the part to "
                        "train")  # fmt: skip
    model.freeze(freeze_language_model=llm, freeze_vision_model=vision, freeze_vision_projection=projector)
