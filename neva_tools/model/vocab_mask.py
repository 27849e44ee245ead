"""Keep the vocabulary's padding rows out of the softmax.

Megatron pads the vocabulary to a multiple of ``make_vocab_size_divisible_by × TP`` with zero rows, and those
rows' logits (0) take part in the cross-entropy's softmax, so the loss depends on the padded size, i.e. on TP
(measured on a tiny model: 4.83 at TP=1, 5.29 at TP=2) and differs from the Hugging Face model's. A forward hook
on the output layer sets the logits of padded columns to the dtype's minimum: the loss is then the true
vocabulary's at any TP, and padded rows get no gradient. The true vocabulary is the model's: with tokens added to the
tokenizer (``neva_tools.model.added_vocab``) it is the tokenizer's size, so the added tokens' columns stay unmasked.
"""

from __future__ import annotations

from typing import Any

import torch


def mask_padded_vocab(output_layer: torch.nn.Module, vocab_size: int) -> torch.utils.hooks.RemovableHandle | None:
    """Mask logits of columns ``≥ vocab_size`` of ``output_layer`` (a vocab-parallel ``ColumnParallelLinear``)."""
    from megatron.core import parallel_state

    rank = parallel_state.get_tensor_model_parallel_rank()
    world = parallel_state.get_tensor_model_parallel_world_size()
    per_rank = getattr(output_layer, "output_size_per_partition", None)
    if per_rank is None:
        return None
    if per_rank * world <= vocab_size:
        return None  # nothing padded
    columns = torch.arange(rank * per_rank, (rank + 1) * per_rank, device="cpu")  # not the default device
    padded = columns >= vocab_size
    on_device: dict[torch.device, torch.Tensor] = {}  # the mask moved to the logits' device once, not every step

    def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
        logits, bias = output
        mask = on_device.get(logits.device)
        if mask is None:
            mask = on_device.setdefault(logits.device, padded.to(logits.device))
        return logits.masked_fill(mask, torch.finfo(logits.dtype).min), bias

    return output_layer.register_forward_hook(hook)
