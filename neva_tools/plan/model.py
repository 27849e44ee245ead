"""What ``neva plan`` plans: the model (LLM, vision tower, projector, what is frozen) and the parameters each
pipeline rank holds.

NeVA as megatron-core's ``LLaVAModel`` places it: the vision tower and the projector with the first pipeline stage's
first model chunk, the LLM's decoder layers split evenly over ``PP × VPP`` chunks. Parameter names carry
``LLaVAModel``'s prefixes (``language_model.``, ``vision_model.``, ``vision_projection.``); a text-only model
(``vision`` None) is a bare ``GPTModel``.
"""

from __future__ import annotations

from dataclasses import dataclass

from neva_tools.errors import NevaError
from neva_tools.plan.params import Param, llm_params, projector_params, stage_layers, vision_params
from neva_tools.plan.shapes import LlmShape, VisionShape


@dataclass(frozen=True)
class PlannedModel:
    """The model and its freeze settings (``mm_cfg.llm.freeze``, ``vision_encoder.freeze``,
    ``freeze_mm_mlp_adapter``)."""

    llm: LlmShape
    vision: VisionShape | None = None
    projector: str = "mlp2x_gelu"
    newline: bool = False  # spatial_unpad's image_newline
    freeze_llm: bool = False
    freeze_vision: bool = True
    freeze_projector: bool = False

    def check(self, tp: int, pp: int, vpp: int = 1) -> None:
        """``NevaError`` when megatron-core cannot split the model this way."""
        llm = self.llm
        for what, value in (("num_attention_heads", llm.heads), ("num_query_groups", llm.groups)):
            if value % tp:
                raise NevaError(f"tensor_model_parallel_size ({tp}) must divide the LLM's {what} ({value})")
        if llm.ffn % tp:
            raise NevaError(f"tensor_model_parallel_size ({tp}) must divide the LLM's ffn_hidden_size ({llm.ffn})")
        if llm.num_layers % (pp * vpp):
            raise NevaError(f"pipeline_model_parallel_size × virtual stages ({pp} × {vpp}) must divide the LLM's "
                            f"num_layers ({llm.num_layers})")  # fmt: skip
        if self.vision is not None:
            arch = self.vision.arch
            for what, value in (("num_attention_heads", arch.num_heads), ("ffn_hidden_size", arch.ffn_hidden_size)):
                if value % tp:
                    raise NevaError(f"tensor_model_parallel_size ({tp}) must divide the vision {what} ({value})")
            if llm.hidden % tp:
                raise NevaError(f"tensor_model_parallel_size ({tp}) must divide the LLM hidden size ({llm.hidden})")

    def rank_chunks(self, *, tp: int, pp: int = 1, vpp: int = 1, pp_rank: int = 0) -> list[list[Param]]:
        """The parameters of each model chunk on pipeline rank ``pp_rank`` (one chunk without ``vpp``)."""
        self.check(tp, pp, vpp)
        chunks = []
        neva = self.vision is not None
        for chunk in range(vpp):
            first = pp_rank == 0 and chunk == 0
            last = pp_rank == pp - 1 and chunk == vpp - 1
            layers = stage_layers(self.llm.num_layers, pp, vpp, pp_rank, chunk)
            params = llm_params(self.llm, tp=tp, layers=layers, pre_process=first, post_process=last, pp=pp,
                                trainable=not self.freeze_llm, prefix="language_model." if neva else "")  # fmt: skip
            if neva and first:
                assert self.vision is not None
                params += vision_params(self.vision, tp=tp, trainable=not self.freeze_vision, prefix="vision_model.")
                params += projector_params(self.projector, self.vision.arch.hidden_size, self.llm.hidden, tp=tp,
                                           newline=self.newline, trainable=not self.freeze_projector,
                                           prefix="vision_projection.")  # fmt: skip
            chunks.append(params)
        return chunks

    def parameter_count(self, tp: int = 1) -> dict[str, int]:
        """Parameters of each part at ``tp`` (all ranks of one TP group; padded vocabulary)."""
        llm = llm_params(self.llm, tp=1, layers=range(self.llm.num_layers), pre_process=True, post_process=True, pp=1)
        counts = {"llm": sum(p.numel for p in llm) + (self.llm.padded_vocab(tp) - self.llm.padded_vocab(1))
                  * self.llm.hidden * (1 if self.llm.tied else 2)}  # fmt: skip
        if self.vision is not None:
            counts["vision"] = sum(p.numel for p in vision_params(self.vision, tp=1))
            counts["projector"] = sum(
                p.numel
                for p in projector_params(
                    self.projector, self.vision.arch.hidden_size, self.llm.hidden, tp=1, newline=self.newline
                )
            )
        return counts
