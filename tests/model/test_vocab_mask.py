"""Padded vocabulary rows stay out of the loss: the same model padded to 256 or 384 rows gives one loss."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from neva_tools.model.gpt import build_gpt_model
from neva_tools.model.vocab_mask import mask_padded_vocab

sys.path.insert(0, str(Path(__file__).parent))
from neva_tiny import TINY_GPT

VOCAB = 200  # true vocabulary; padded to 256 (e.g. 128 × TP 2) or 384 (128 × TP 3)


def _model(padded: int, source: torch.nn.Module | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_gpt_model(TINY_GPT, padded_vocab_size=padded)
    if source is not None:  # the same weights; padding rows zero, as conversion writes them
        with torch.no_grad():
            for p, q in zip(model.parameters(), source.parameters(), strict=True):
                p.zero_()
                p[tuple(slice(0, n) for n in q.shape)] = q[tuple(slice(0, n) for n in p.shape)]
    with torch.no_grad():  # zero padding rows in both
        model.embedding.word_embeddings.weight[VOCAB:] = 0
        model.output_layer.weight[VOCAB:] = 0
    return model


def test_loss_ignores_padding_rows_whatever_the_padded_size(dist: None) -> None:
    small = _model(256)
    large = _model(384, source=small)
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    positions, labels = torch.arange(16).expand(2, -1), tokens.roll(-1, dims=1)
    unmasked = [m(tokens, positions, None, labels=labels).mean().item() for m in (small, large)]
    assert abs(unmasked[0] - unmasked[1]) > 1e-3  # without the mask the padded size changes the loss

    handles = [mask_padded_vocab(m.output_layer, VOCAB) for m in (small, large)]
    assert all(h is not None for h in handles)
    masked = [m(tokens, positions, None, labels=labels) for m in (small, large)]
    assert torch.allclose(masked[0], masked[1], atol=1e-5)
    logits = small(tokens, positions, None)[..., :VOCAB]  # the true vocabulary's cross-entropy
    expected = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="none").reshape(2, 16)
    torch.testing.assert_close(masked[0], expected, atol=1e-5, rtol=1e-5)
    masked[1].mean().backward()
    assert float(large.output_layer.weight.grad[VOCAB:].abs().max()) == 0.0  # padding rows get no gradient


def test_nothing_to_mask_without_padding(dist: None) -> None:
    assert mask_padded_vocab(_model(256).output_layer, 256) is None
