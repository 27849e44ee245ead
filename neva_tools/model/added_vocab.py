"""Tokens added to the tokenizer beyond the LLM's vocabulary: their embedding and output rows.

NeMo's NeVA tutorial adds ``<extra_id_0..7>`` to the LLaMA tokenizer (``neva tokenizer add-tokens --preset neva``)
and trains with it: megatron pads the vocabulary to a multiple of ``make_vocab_size_divisible_by × TP`` and the added
ids take padded rows. Here the model's vocabulary is the tokenizer's when that is larger (:func:`vocab_plan`); the
padded size follows from it by megatron's rule, so the embedding and output layer grow when the padded rows are too
few. The added rows start as LLaVA's ``smart_tokenizer_and_embedding_resize`` sets them: the mean of the LLM's input
embedding rows and the mean of its output rows (:func:`init_added_rows`). What a ``.nemo`` holds in padded rows
(zeros from ``neva convert``, random values from NeMo) is overwritten, so the start is the same at any TP. The rows
train with the LLM (stage 2); with a frozen LLM they keep their initial values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from neva_tools.tokenizer.vocab import DEFAULT_DIVISIBLE_BY, padded_vocab_size


@dataclass(frozen=True)
class VocabPlan:
    """The LLM's vocabulary and the model's (the tokenizer's when larger), each with its padded rows at TP ``tp``."""

    llm_vocab: int
    vocab: int
    llm_padded: int
    padded: int
    tp: int
    divisible_by: int

    @property
    def added(self) -> int:
        """Tokens beyond the LLM's vocabulary (0: none)."""
        return self.vocab - self.llm_vocab

    @property
    def grown(self) -> int:
        """Rows the embedding and output layer gain over the LLM's padded vocabulary (0: the padded rows suffice)."""
        return self.padded - self.llm_padded


def vocab_plan(llm_cfg: dict[str, Any], llm_vocab: int, tokenizer_size: int, tp: int) -> VocabPlan:
    """The vocabulary a model of the LLM (config ``llm_cfg``, ``llm_vocab`` tokens) trains with a tokenizer of
    ``tokenizer_size`` ids at TP ``tp``."""
    divisible = int(llm_cfg.get("make_vocab_size_divisible_by") or DEFAULT_DIVISIBLE_BY)
    vocab = max(llm_vocab, tokenizer_size)
    llm_padded, padded = padded_vocab_size(llm_vocab, tp, divisible), padded_vocab_size(vocab, tp, divisible)
    return VocabPlan(llm_vocab, vocab, llm_padded, padded, tp, divisible)


def plan_notes(plan: VocabPlan, *, llm_frozen: bool) -> list[str]:
    """What a training run logs about added tokens (nothing when the tokenizer fits the LLM's vocabulary)."""
    if not plan.added:
        return []
    ids = f"ids {plan.llm_vocab}-{plan.vocab - 1}"
    rule = f"a multiple of make_vocab_size_divisible_by {plan.divisible_by} × TP {plan.tp}"
    if plan.grown:
        where = (f"the LLM's {plan.llm_padded} padded rows are too few: the embedding and output layer grow by "
                 f"{plan.grown} rows to {plan.padded} ({rule})")  # fmt: skip
    else:
        where = f"they take padded rows of the LLM's {plan.llm_padded}-row embedding and output layer ({rule})"
    notes = [f"the tokenizer has {plan.added} tokens beyond the LLM's {plan.llm_vocab}-token vocabulary ({ids}); "
             f"{where}; their rows start as the mean of the LLM's input-embedding rows and of its output "
             "rows"]  # fmt: skip
    if llm_frozen:
        notes.append(f"the LLM is frozen (model.mm_cfg.llm.freeze: true): the {plan.added} added tokens' rows stay at "
                     "their initial values in this run; they are trained when the LLM trains (stage 2)")  # fmt: skip
    return notes


def mean_row(weight: torch.Tensor, llm_vocab: int) -> torch.Tensor:
    """The mean of rows ``[0, llm_vocab)`` of a full (TP=1) vocabulary tensor, summed in float64, in its dtype."""
    return (weight[:llm_vocab].double().sum(dim=0) / llm_vocab).to(weight.dtype)


def with_added_rows(weight: torch.Tensor, llm_vocab: int, vocab: int) -> torch.Tensor:
    """A full vocabulary tensor cut to ``llm_vocab`` rows and extended to ``vocab`` by :func:`mean_row` (exports)."""
    base = weight[:llm_vocab]
    if vocab <= llm_vocab:
        return base
    return torch.cat([base, mean_row(base, llm_vocab).expand(vocab - llm_vocab, -1)])


def _vocab_weights(language_model: Any) -> list[torch.Tensor]:
    """The input embedding and, when untied, the output layer weight of a megatron-core ``GPTModel``."""
    embedding = getattr(language_model, "embedding", None)  # pipeline stages: on the first only
    weights = [embedding.word_embeddings.weight] if embedding is not None else []
    output = getattr(language_model, "output_layer", None)
    tied = getattr(language_model, "share_embeddings_and_output_weights", False)
    if output is not None and getattr(output, "weight", None) is not None and not tied:
        weights.append(output.weight)
    return weights


def init_added_rows(language_model: Any, llm_vocab: int, vocab: int) -> None:
    """Set rows ``[llm_vocab, vocab)`` of the vocab-parallel input embedding and output layer of ``language_model``
    (this TP rank's rows) to the mean of rows ``[0, llm_vocab)`` (collective over the TP group)."""
    if vocab <= llm_vocab:
        return
    from megatron.core import parallel_state

    rank = parallel_state.get_tensor_model_parallel_rank()
    group = parallel_state.get_tensor_model_parallel_group()
    world = parallel_state.get_tensor_model_parallel_world_size()
    for weight in _vocab_weights(language_model):
        rows = weight.shape[0]
        start = rank * rows
        with torch.no_grad():
            total = weight[: max(0, min(rows, llm_vocab - start))].double().sum(dim=0)
            if world > 1:
                torch.distributed.all_reduce(total, group=group)
            lo, hi = max(llm_vocab - start, 0), min(vocab - start, rows)
            if hi > lo:
                weight[lo:hi] = (total / llm_vocab).to(weight.dtype)
