"""Activation recompute: NeMo's keys map to megatron-core's, and full / selective recompute give the same loss and
gradients as none (dropout on, so the RNG states must be restored for the recomputation), for the LLM and the
vision encoder."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from neva_tiny import IMAGE, LLM, PATCH, TINY_GPT, VOCAB, batch

from neva_tools.errors import NevaError
from neva_tools.model.recompute import recompute_settings

SELECTIVE = {"activations_checkpoint_granularity": "selective"}
UNIFORM = {"activations_checkpoint_granularity": "full", "activations_checkpoint_method": "uniform",
           "activations_checkpoint_num_layers": 1}  # fmt: skip
BLOCK = {"activations_checkpoint_granularity": "full", "activations_checkpoint_method": "block",
         "activations_checkpoint_num_layers": 2}  # fmt: skip
DROPOUT = {"hidden_dropout": 0.1, "attention_dropout": 0.1}


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({}, {}),
        ({"activations_checkpoint_granularity": None, "activations_checkpoint_method": "uniform"}, {}),
        ({**SELECTIVE, "activations_checkpoint_method": "uniform", "activations_checkpoint_num_layers": 1},
         {"recompute_granularity": "selective"}),  # NeMo: not used with selective
        (UNIFORM, {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}),
        ({**UNIFORM, "activations_checkpoint_num_layers": None},
         {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}),
        (BLOCK, {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 2}),
    ],
)  # fmt: skip
def test_nemo_keys_map_to_megatron(keys: dict[str, Any], expected: dict[str, Any]) -> None:
    assert recompute_settings(keys, num_layers=4) == expected


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"activations_checkpoint_granularity": "partial"}, "granularity is 'partial'; use selective, full or null"),
        ({"activations_checkpoint_granularity": "full"}, "method is None; full recompute needs uniform or block"),
        ({**BLOCK, "activations_checkpoint_num_layers": None}, "num_layers is not set; block recompute needs"),
        ({**UNIFORM, "activations_checkpoint_num_layers": 5}, "num_layers is 5; it must be 1 to 4"),
    ],
)
def test_bad_keys_name_the_value(keys: dict[str, Any], message: str) -> None:
    with pytest.raises(NevaError, match=message):
        recompute_settings(keys, num_layers=4)


def _same_grads(grads: list[torch.Tensor], ref: list[torch.Tensor]) -> bool:
    """Equal up to fp32 rounding: the recomputed graph sums some gradient contributions in another order
    (measured: at most 3.3e-7 on gradients up to 1.4)."""
    return all(torch.allclose(a, b, rtol=1e-6, atol=1e-6) for a, b in zip(grads, ref, strict=True))


def _gpt_loss_and_grads(keys: dict[str, Any]) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """Loss, gradients and the number of decoder-layer forward calls of the tiny GPT with ``keys``."""
    from neva_tools.model.cpu_compat import model_parallel_seed
    from neva_tools.model.gpt import build_gpt_model

    model_parallel_seed(7)
    model = build_gpt_model({**TINY_GPT, **DROPOUT, **keys}, padded_vocab_size=128)
    calls = []
    for layer in model.decoder.layers:
        layer.register_forward_hook(lambda *_: calls.append(1))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (2, 16), generator=g)
    loss = model(ids, torch.arange(16).expand(2, 16), None, labels=ids).mean()
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()], len(calls)


@pytest.mark.parametrize("keys", [SELECTIVE, UNIFORM, BLOCK], ids=["selective", "uniform", "block"])
def test_gpt_recompute_equals_none(dist: None, keys: dict[str, Any]) -> None:
    ref_loss, ref_grads, ref_calls = _gpt_loss_and_grads({})
    loss, grads, calls = _gpt_loss_and_grads(keys)
    assert torch.equal(loss, ref_loss)
    assert _same_grads(grads, ref_grads)
    # full recompute runs every recomputed layer's forward twice; selective only re-runs the core attention
    assert calls == ref_calls * (2 if keys is not SELECTIVE else 1)


def _neva_loss_and_grads(keys: dict[str, Any]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    from neva_tiny import vision_config

    from neva_tools.model.cpu_compat import model_parallel_seed
    from neva_tools.model.neva import NevaParts, build_neva_model, freeze
    from neva_tools.model.recompute import recompute_settings
    from neva_tools.train.module import llava_loss

    model_parallel_seed(7)
    vision = vision_config(1)
    vision.hidden_dropout = vision.attention_dropout = 0.1
    for key, value in recompute_settings(keys, vision.num_layers).items():
        setattr(vision, key, value)
    model = build_neva_model(NevaParts({**LLM, **DROPOUT, **keys}, VOCAB, vision, IMAGE, PATCH))
    freeze(model, llm=False, vision=False)
    loss, _ = llava_loss(model, batch())
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()]


@pytest.mark.parametrize("keys", [SELECTIVE, UNIFORM], ids=["selective", "uniform"])
def test_neva_recompute_equals_none_with_a_trainable_vision_encoder(dist: None, keys: dict[str, Any]) -> None:
    ref_loss, ref_grads = _neva_loss_and_grads({})
    loss, grads = _neva_loss_and_grads(keys)
    assert torch.equal(loss, ref_loss)
    assert _same_grads(grads, ref_grads)
