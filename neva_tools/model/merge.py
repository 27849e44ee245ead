"""Image and text embeddings merged by one ``index_select``, with megatron-core's own placement rules.

megatron-core's ``LLaVAModel._preprocess_data`` places the text embeddings and the image embeddings into the
combined sequence with advanced indexing: a gather and a scatter for the text, a boolean-mask scatter for the
images, then a transpose copy to ``[s, b, h]``. On the CPU the backward of that gather (an accumulating
``index_put``) alone costs more than the whole merge needs.

:class:`NevaLLaVAModel` keeps megatron-core's placement rules (several images and tiles per sample, text-only
samples, padding, truncation to the LLM's length, the labels and the loss mask) by running its method on *probe*
embeddings of width 1 whose values are row numbers: the probe result says, for every combined position, which
text or image row lands there (0: padding). The real embeddings are then gathered in one ``index_select``
straight into the ``[s, b, h]`` layout; its backward is one ``index_add``. Labels and loss mask are megatron-core's
own. Inference with a KV cache, pipeline stages without the embedding, context or sequence parallelism and the
FSDP dummy-image case use megatron-core's method unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.models.multimodal.llava_model import LLaVAModel


class NevaLLaVAModel(LLaVAModel):
    """megatron-core ``LLaVAModel`` whose training-time embedding merge is one ``index_select``."""

    def _preprocess_data(self, image_embeddings: torch.Tensor | None, language_embeddings: torch.Tensor | None,
                         input_ids: torch.Tensor, loss_mask: torch.Tensor | None, labels: torch.Tensor | None,
                         use_inference_kv_cache: bool, inference_context: Any, image_token_index: int,
                         num_image_tiles: torch.Tensor, *args: Any, **kwargs: Any) -> Any:  # fmt: skip
        """``(embeddings [s, b, h], labels [b, s], loss_mask [b, s])`` as megatron-core's method returns them."""
        plain = (
            self.pre_process and not use_inference_kv_cache and not args and kwargs.get("inference_params") is None
            and image_embeddings is not None and language_embeddings is not None
            and self.context_parallel_lm == 1 and not self.sequence_parallel_lm
            and not (num_image_tiles.shape[0] == 0 and image_embeddings.shape[0] > 0)  # FSDP's dummy image
        )  # fmt: skip
        if not plain:
            return super()._preprocess_data(image_embeddings, language_embeddings, input_ids, loss_mask, labels,
                                            use_inference_kv_cache, inference_context, image_token_index,
                                            num_image_tiles, *args, **kwargs)  # fmt: skip
        hidden = language_embeddings.shape[-1]
        text_rows = language_embeddings.shape[0] * language_embeddings.shape[1]
        image_rows = image_embeddings.shape[0] * image_embeddings.shape[1]
        device = language_embeddings.device
        with torch.no_grad():  # row numbers (exact in float64): 0 padding, then text rows, then image rows
            text_probe = torch.arange(1, 1 + text_rows, dtype=torch.float64, device=device)
            image_probe = torch.arange(1 + text_rows, 1 + text_rows + image_rows, dtype=torch.float64, device=device)
            probe, final_labels, final_loss_mask = super()._preprocess_data(
                image_probe.view(*image_embeddings.shape[:2], 1), text_probe.view(*language_embeddings.shape[:2], 1),
                input_ids, loss_mask, labels, use_inference_kv_cache, inference_context, image_token_index,
                num_image_tiles,
            )  # fmt: skip
            rows = probe[..., 0].long()  # [s, b]
        source = torch.cat((language_embeddings.new_zeros(1, hidden), language_embeddings.reshape(-1, hidden),
                            image_embeddings.reshape(-1, hidden).to(language_embeddings.dtype)))  # fmt: skip
        merged = source.index_select(0, rows.reshape(-1)).view(*rows.shape, hidden)
        return merged, final_labels, final_loss_mask
