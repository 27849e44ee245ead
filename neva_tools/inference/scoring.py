"""Per-token negative log-likelihood of text under a NeVA model, over the true vocabulary.

The model's output layer is padded to a multiple of ``make_vocab_size_divisible_by × TP`` with rows that are not
tokens. Training's loss (megatron-core's vocab-parallel cross-entropy over the padded logits) counts them in the
softmax, so the same weights give a different loss at another TP, and a Hugging Face export (true vocabulary only)
would disagree. Here the padded entries are set to -inf first, then megatron-core's
``vocab_parallel_cross_entropy`` runs on the vocab-parallel logits (no gather): the result is the same at any TP
and equals the exported model's. Logits are read at each text token's position in the image-expanded sequence
(an ``IMAGE_TOKEN_INDEX`` at position ``t`` occupies as many positions as the image's embeddings: the batch's
``image_tokens``, else ``num_image_tiles × img_seq_len``).
"""

from __future__ import annotations

from typing import Any

import torch

from neva_tools.data.templates import IGNORE_INDEX, IMAGE_TOKEN_INDEX


def text_positions(input_ids: torch.Tensor, img_seq_len: int | torch.Tensor) -> torch.Tensor:
    """Position of every text token (and of the last embedding of every image) in the image-expanded sequence;
    ``img_seq_len``: one count for every image, or each image's (row-major order of the image tokens)."""
    if isinstance(img_seq_len, int):
        return torch.cumsum(torch.where(input_ids == IMAGE_TOKEN_INDEX, img_seq_len, 1), dim=1) - 1
    widths = torch.ones_like(input_ids)
    widths[input_ids == IMAGE_TOKEN_INDEX] = img_seq_len.to(device=input_ids.device, dtype=widths.dtype)
    return torch.cumsum(widths, dim=1) - 1


@torch.no_grad()
def token_nll(model: Any, batch: dict[str, Any], vocab_size: int) -> torch.Tensor:
    """``-log p(labels[t] | tokens ≤ t)`` per text position ``[b, s]`` (0 where ``labels`` is ``IGNORE_INDEX``).

    ``batch`` is a collated batch (``neva_tools.data.dataset.collate``): ``labels`` are ``input_ids`` shifted left.
    Only ids below ``vocab_size`` compete in the softmax.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    param = next(model.parameters())
    device = param.device
    ids, tiles = batch["input_ids"].to(device), batch.get("num_image_tiles")
    tiles = None if tiles is None else tiles.to(device)
    placement = {"image_sizes": batch["image_sizes"].to(device)} if "image_sizes" in batch else {}
    images = batch["images"].to(device=device, dtype=param.dtype)  # bf16 weights take bf16 images
    output = model(images, ids, batch["position_ids"].to(device), None, num_image_tiles=tiles,
                   runtime_gather_output=False, **placement)  # fmt: skip
    logits = output[0] if isinstance(output, tuple) else output  # [b, s_expanded, V / TP]
    widths = batch.get("image_tokens")
    if widths is None:
        widths = model.img_seq_len if tiles is None else tiles * model.img_seq_len
    positions = text_positions(ids, widths)
    logits = torch.gather(logits, 1, positions[..., None].expand(-1, -1, logits.shape[-1])).float()
    part = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * part
    logits[..., max(0, vocab_size - start) :] = float("-inf")  # padded rows are not tokens
    labels = batch["labels"].to(device)
    nll = vocab_parallel_cross_entropy(logits, labels.clamp(min=0))
    return (nll * (labels != IGNORE_INDEX)).cpu()
