"""Output layer and cross-entropy only where a position has a label.

megatron-core's ``GPTModel`` computes the logits of every position and the cross-entropy of every position, and the
caller multiplies the loss by its mask. In NeVA most positions carry no label: a LLaVA-1.5 pretraining sample has
576 image embeddings and a few dozen caption tokens, and finetuning masks the prompt too. The output layer
(``hidden × vocab``) and the ``[positions, vocab]`` logits of those positions are wasted work and memory.

:func:`supervised_logits_only` hooks one ``GPTModel`` (NeVA's ``language_model`` or a text GPT):

- a forward pre-hook on the model reads ``labels`` (``[b, s]``; a negative label means "no loss here", as
  ``IGNORE_INDEX`` -100 that LLaVAModel gives image positions);
- a forward pre-hook on ``output_layer`` keeps only the hidden states of labelled positions (``[n, 1, h]``);
- ``compute_language_model_loss`` computes the cross-entropy of those ``n`` positions and scatters it into the
  ``[b, s]`` loss the caller expects (0 elsewhere, where the caller's mask is 0 as well).

Weights, state-dict keys and the loss at labelled positions are unchanged; inference (no labels) is untouched.
With sequence parallelism the output layer gathers the sequence itself, so nothing is selected there. On one TP
rank the cross-entropy is ``torch.nn.functional.cross_entropy`` (one fused kernel); across ranks it is megatron's
vocab-parallel cross-entropy. Selecting the positions costs one host synchronisation per forward pass (the
number of labelled positions sizes the selection); labels, rows and the scattered loss are picked by index on the
device.
"""

from __future__ import annotations

from typing import Any

import torch


class _Selection:
    """Labelled positions of the current forward pass, shared by the hooks of one model."""

    def __init__(self) -> None:
        self.shape: torch.Size | None = None  # [s, b] of the labels
        self.index: torch.Tensor | None = None  # [n] flat indices of the labelled positions in [s, b] order
        self.labels: torch.Tensor | None = None  # [n] labels of the selected positions


class Undo:
    """Removes the hooks of :func:`supervised_logits_only` again (``remove()``)."""

    def __init__(self, model: torch.nn.Module, handles: list[torch.utils.hooks.RemovableHandle]) -> None:
        self.model, self.handles = model, handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.model.__dict__.pop("compute_language_model_loss", None)  # back to the class's method


def supervised_logits_only(model: torch.nn.Module) -> Undo | None:
    """Make ``model`` (a megatron-core ``GPTModel`` with an output layer) compute logits only at labelled
    positions when it is called with ``labels``; ``None`` when it has no output layer or is sequence-parallel."""
    from megatron.core import tensor_parallel
    from megatron.core.utils import get_pg_size

    output_layer = getattr(model, "output_layer", None)
    if output_layer is None or getattr(output_layer, "sequence_parallel", False):
        return None
    state = _Selection()
    full_loss = model.compute_language_model_loss
    tp = get_pg_size(output_layer.tp_group)  # the group its vocabulary is split over

    def start(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        labels = kwargs.get("labels")
        state.shape = state.index = state.labels = None
        if labels is None:
            return
        flat = labels.t().reshape(-1)  # [s·b], in the output layer's [s, b] order
        index = (flat >= 0).nonzero().squeeze(1)  # the one host synchronisation: how many positions are labelled
        if index.numel() == flat.numel():
            return  # every position is labelled: nothing to skip
        state.shape, state.index = labels.t().shape, index  # index_select: far cheaper than a mask, both ways
        state.labels = flat.index_select(0, index)

    def select(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if state.shape is None:
            return None
        hidden = args[0]
        if hidden.shape[:2] != state.shape:
            raise RuntimeError(f"output layer input {tuple(hidden.shape)} does not match labels "
                               f"{tuple(state.shape)} (sequence-parallel or pipeline input?)")  # fmt: skip
        return (hidden.flatten(0, 1).index_select(0, state.index).unsqueeze(1), *args[1:]), kwargs

    def loss(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        shape, index, picked = state.shape, state.index, state.labels
        if shape is None:
            return full_loss(labels, logits)
        state.shape = state.index = state.labels = None
        if tp == 1:
            flat = torch.nn.functional.cross_entropy(logits.squeeze(1).float(), picked, reduction="none")
        else:
            flat = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), picked.unsqueeze(1))[:, 0]
        out = flat.new_zeros(shape.numel()).index_copy_(0, index, flat)
        return out.view(shape).t()  # [b, s]

    handles = [model.register_forward_pre_hook(start, with_kwargs=True),
               output_layer.register_forward_pre_hook(select, with_kwargs=True)]  # fmt: skip
    model.compute_language_model_loss = loss
    return Undo(model, handles)
