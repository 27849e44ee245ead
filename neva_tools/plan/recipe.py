"""A loaded training config (``neva_tools.config.load``) as the model, batch and layout ``neva plan`` estimates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from neva_tools.errors import NevaError
from neva_tools.plan.activations import Batch, Recompute
from neva_tools.plan.estimate import Layout
from neva_tools.plan.model import PlannedModel
from neva_tools.plan.shapes import llm_shape, vision_shape

#: ``trainer.precision`` values → ``neva_tools.train.megatron_optim.PRECISIONS`` names.
PRECISIONS = {"32": "32", "32-true": "32", "bf16": "bf16", "bf16-mixed": "bf16", "bf16-true": "bf16", "16": "fp16",
              "16-mixed": "fp16"}  # fmt: skip


@dataclass(frozen=True)
class PlanInputs:
    """What the config says: the model, a micro-batch's shape, and the layout it asks for."""

    model: PlannedModel
    batch: Batch
    layout: Layout
    text_only: bool


def _recompute(m: Any) -> Recompute:
    from neva_tools.model.recompute import recompute_settings

    settings = recompute_settings(OmegaConf.to_container(m, resolve=True), 1 << 30)  # type: ignore[arg-type]
    return Recompute(settings.get("recompute_granularity"), settings.get("recompute_method"),
                     int(settings.get("recompute_num_layers") or 1))  # fmt: skip


def plan_inputs(cfg: DictConfig, *, llm_config: str | None = None, vision_config: str | None = None,
                gpus: int | None = None) -> PlanInputs:  # fmt: skip
    """The :class:`PlanInputs` of ``cfg``; ``gpus`` (default: the config's layout, DP 1) sets the DP size."""
    from neva_tools.data.anyres import ImageLayout
    from neva_tools.train.megatron_optim import uses_distributed_optimizer

    m = cfg.model
    source = llm_config or m.mm_cfg.llm.from_pretrained
    if not source:
        raise NevaError("model.mm_cfg.llm.from_pretrained is not set; set it or give --llm-config (a Hugging Face "
                        "config.json, a model_config.yaml or a .nemo)")  # fmt: skip
    llm = llm_shape(source)
    text_only = bool(m.text_pretrain.enabled)
    precision = PRECISIONS.get(str(cfg.trainer.precision))
    if precision is None:
        raise NevaError(f"trainer.precision ({cfg.trainer.precision}) is not one of {', '.join(PRECISIONS)}")
    tp, pp = int(m.tensor_model_parallel_size), int(m.pipeline_model_parallel_size)
    vpp = int(OmegaConf.select(m, "virtual_pipeline_model_parallel_size", default=None) or 1)
    dp = max(1, (gpus or tp * pp) // (tp * pp))
    layout = Layout(tp=tp, pp=pp, dp=dp, vpp=vpp, micro_batch=int(m.micro_batch_size),
                    global_batch=int(m.global_batch_size), precision=precision,
                    distributed_optimizer=uses_distributed_optimizer(str(m.optim.name)),
                    overlap_grad_reduce=bool(m.optim.overlap_grad_reduce), recompute=_recompute(m))  # fmt: skip
    if text_only:
        model = PlannedModel(llm, freeze_llm=False)
        return PlanInputs(model, Batch(layout.micro_batch, int(m.text_pretrain.seq_length)), layout, True)
    encoder = m.mm_cfg.vision_encoder
    if not encoder.from_pretrained and vision_config is None:
        raise NevaError("model.mm_cfg.vision_encoder.from_pretrained is not set; set it or give --vision-config")
    vision = vision_shape(str(encoder.from_pretrained), int(encoder.vision_select_layer), vision_config)
    image = ImageLayout.from_config(m.data, m.mm_cfg, vision.arch.image_size, vision.arch.patch_size)
    per_image = image.max_tokens()
    tiles = 1 + max((h // image.image_size) * (w // image.image_size) for h, w in image.pinpoints) if image.tiled else 1
    seq = int(m.data.max_seq_length)
    images = max(1, seq // per_image) if m.data.packing else 1  # a packed row holds as many images as fit
    model = PlannedModel(
        llm,
        vision,
        projector=str(m.mm_cfg.mm_mlp_adapter_type),
        newline=image.merge == "spatial_unpad",
        freeze_llm=bool(m.mm_cfg.llm.freeze),
        freeze_vision=bool(encoder.freeze),
        freeze_projector=bool(m.mm_cfg.freeze_mm_mlp_adapter),
    )
    batch = Batch(layout.micro_batch, seq, tiles=tiles * images, image_tokens=vision.patches * tiles * images)
    return PlanInputs(model, batch, layout, False)
