"""Logits only at labelled positions: the same per-position loss and gradients as full logits, fewer rows."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from dist_helpers import run_distributed
from neva_tiny import TINY_GPT, VOCAB, batch, build


def _masked_labels(b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels with -100 where unsupervised, loss mask), as ``llava_loss`` passes them."""
    mask = (b["labels"] != -100).float()
    return b["labels"].clone(), mask


def _rows_seen(model: Any) -> list[int]:
    """Positions (rows × batch) each call of the output layer computes logits for."""
    rows: list[int] = []
    model.language_model.output_layer.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[:2].numel()))
    return rows


def _expanded_labels(model: Any, b: dict[str, torch.Tensor]) -> torch.Tensor:
    """The ``[b, s]`` labels LLaVAModel hands its language model (captured by a pre-hook)."""
    seen: dict[str, torch.Tensor] = {}
    handle = model.language_model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.__setitem__("labels", kwargs["labels"]), with_kwargs=True
    )
    labels, mask = _masked_labels(b)
    with torch.no_grad():
        model(b["images"], b["input_ids"], b["position_ids"], None, labels=labels, loss_mask=mask)
    handle.remove()
    return seen["labels"]


def test_loss_and_gradients_equal_full_logits(dist: None) -> None:
    torch.manual_seed(0)
    model = build(1, freeze_llm=False, freeze_vision=False)
    b = batch()
    expanded = _expanded_labels(model, b)
    labelled = int((expanded >= 0).sum())
    assert 0 < labelled < expanded.numel()  # image and prompt positions are unlabelled

    rows = _rows_seen(model)
    labels, mask = _masked_labels(b)
    loss, new_mask = model(b["images"], b["input_ids"], b["position_ids"], None, labels=labels, loss_mask=mask)
    assert rows == [labelled]  # the output layer saw only the labelled positions
    assert float(loss[expanded < 0].abs().max()) == 0.0
    ours = (loss * new_mask).sum() / new_mask.sum()
    ours.backward()
    ours_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    logits, _ = model(b["images"], b["input_ids"], b["position_ids"], None, labels=None, loss_mask=mask)
    assert rows[-1] == expanded.numel()  # without labels (inference) every position gets logits
    full = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), expanded.clamp(min=0).reshape(-1),
                           reduction="none").reshape(expanded.shape)  # fmt: skip
    torch.testing.assert_close(loss[expanded >= 0], full[expanded >= 0], atol=1e-6, rtol=1e-6)
    reference = (full * new_mask).sum() / new_mask.sum()
    reference.backward()
    assert set(ours_grads) == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(ours_grads[name], p.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_every_position_labelled_takes_the_full_path(dist: None) -> None:
    torch.manual_seed(0)
    model = build(1)
    rows = _rows_seen(model)
    tokens = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    labels = tokens.roll(-1, dims=1)
    lm = model.language_model
    loss = lm(tokens, torch.arange(10).expand(2, -1), None, labels=labels)
    assert rows == [20] and loss.shape == (2, 10)
    logits = lm(tokens, torch.arange(10).expand(2, -1), None)
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    torch.testing.assert_close(loss.reshape(-1), expected, atol=1e-6, rtol=1e-6)


def _tp_loss(rank: int, world_size: int) -> list[float]:
    """Per-position loss at labelled positions of the tiny NeVA at TP=world_size (seed 1234)."""
    from neva_tools.model.parallel import destroy_distributed, init_distributed

    init_distributed(tp=world_size, seed=1234)
    try:
        model = build(world_size, freeze_llm=False)
        b = batch()
        mask = (b["labels"] != -100).float()
        with torch.no_grad():
            loss, new_mask = model(b["images"], b["input_ids"], b["position_ids"], None, labels=b["labels"],
                                   loss_mask=mask)  # fmt: skip
        return loss[new_mask > 0].tolist()
    finally:
        destroy_distributed()


def test_tp2_vocab_parallel_loss_equals_tp1() -> None:
    tp1 = run_distributed(_tp_loss, 1)[0]
    tp2 = run_distributed(_tp_loss, 2)
    assert len(tp1) > 0
    for per_rank in tp2:
        assert max(abs(a - b) for a, b in zip(per_rank, tp1, strict=True)) <= 1e-5


def test_remove_restores_full_logits(dist: None) -> None:
    from neva_tools.model.gpt import build_gpt_model
    from neva_tools.model.supervised_logits import supervised_logits_only

    torch.manual_seed(0)
    gpt = build_gpt_model(TINY_GPT, padded_vocab_size=VOCAB)
    rows: list[int] = []
    gpt.output_layer.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[:2].numel()))
    tokens = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    labels = tokens.roll(-1, dims=1)
    labels[:, :4] = -100  # a prompt without loss
    positions = torch.arange(10).expand(2, -1)
    undo = supervised_logits_only(gpt)
    assert undo is not None
    with torch.no_grad():
        selected = gpt(tokens, positions, None, labels=labels)
    undo.remove()
    with torch.no_grad():
        full = gpt(tokens, positions, None, labels=labels.clamp(min=0))
    assert rows == [12, 20]  # 6 labelled positions per sample, then every position
    assert float(selected[labels < 0].abs().max()) == 0.0
    torch.testing.assert_close(selected[labels >= 0], full[labels >= 0], atol=1e-6, rtol=1e-6)
