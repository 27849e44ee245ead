"""Tiny test models (a GPT config; a NeVA: 2-layer LLM + 2-layer ViT) and per-rank functions for run_distributed."""

from __future__ import annotations

from typing import Any

import torch

LLM = {
    "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 96, "num_attention_heads": 4, "num_query_groups": 2,
    "encoder_seq_length": 128, "max_position_embeddings": 128, "position_embedding_type": "rope",
    "normalization": "rmsnorm", "activation": "fast-swiglu", "bias": False,
    "share_embeddings_and_output_weights": False, "hidden_dropout": 0.0, "attention_dropout": 0.0,
}  # fmt: skip
VOCAB = 256
IMAGE, PATCH = 28, 7

#: A tiny plain GPT (NeMo model-section keys) for the GPT builder tests.
TINY_GPT: dict[str, Any] = {
    "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128, "num_attention_heads": 4, "num_query_groups": 2,
    "encoder_seq_length": 32, "max_position_embeddings": 32, "position_embedding_type": "rope",
    "normalization": "rmsnorm", "activation": "fast-swiglu", "bias": False,
    "share_embeddings_and_output_weights": False, "hidden_dropout": 0.0, "attention_dropout": 0.0,
}  # fmt: skip


def vision_config(tp: int) -> Any:
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(
        num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, add_bias_linear=True,
        add_qkv_bias=True, normalization="LayerNorm", layernorm_epsilon=1e-5, gated_linear_unit=False,
        activation_func=torch.nn.functional.gelu, hidden_dropout=0.0, attention_dropout=0.0,
        bias_activation_fusion=False, bias_dropout_fusion=False, apply_query_key_layer_scaling=False,
        persist_layer_norm=False, masked_softmax_fusion=False, use_cpu_initialization=True,
        tensor_model_parallel_size=tp,
    )  # fmt: skip
    cfg.vision_model_type = "clip"
    return cfg


def build(tp: int, freeze_llm: bool = True, freeze_vision: bool = True) -> Any:
    from neva_tools.model.neva import NevaParts, build_neva_model, freeze

    parts = NevaParts({**LLM, "tensor_model_parallel_size": tp}, VOCAB, vision_config(tp), IMAGE, PATCH)
    model = build_neva_model(parts)
    freeze(model, llm=freeze_llm, vision=freeze_vision)
    return model


def batch() -> dict[str, torch.Tensor]:
    from neva_tools.data.templates import IMAGE_TOKEN_INDEX

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 12), generator=g)
    ids[:, 1] = IMAGE_TOKEN_INDEX
    labels = torch.randint(3, VOCAB, (2, 12), generator=g)
    labels[:, :2] = -100
    return {"images": torch.randn(2, 3, IMAGE, IMAGE, generator=g), "input_ids": ids, "labels": labels,
            "position_ids": torch.arange(12).expand(2, 12)}  # fmt: skip


def samples(count: int) -> list[dict[str, torch.Tensor]]:
    """``count`` single-image samples of 12 tokens (the image second, 10 supervised labels), seeded: the first ``n``
    are the same whatever ``count``."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        ids = torch.randint(3, VOCAB, (12,), generator=g)
        ids[1] = -200  # IMAGE_TOKEN_INDEX
        labels = torch.randint(3, VOCAB, (12,), generator=g)
        labels[:2] = -100
        out.append({"images": torch.randn(3, IMAGE, IMAGE, generator=g), "input_ids": ids, "labels": labels,
                    "position_ids": torch.arange(12)})  # fmt: skip
    return out


def loss_and_grads(model: Any, batch: dict[str, Any]) -> tuple[float, dict[str, torch.Tensor]]:
    """The training loss of ``batch`` (``llava_loss``) and the gradients it gives, from zeroed gradients."""
    from neva_tools.train.module import llava_loss

    model.zero_grad(set_to_none=True)
    loss, _ = llava_loss(model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_packed_equals_unpacked(model: Any, unpacked: dict[str, Any],
                                  packed: dict[str, Any]) -> tuple[float, dict[str, torch.Tensor]]:  # fmt: skip
    """The packed batch gives the unpacked one's loss and gradients (the vision tower's among them); returns the
    unpacked loss and gradients."""
    import pytest

    loss_u, grads_u = loss_and_grads(model, unpacked)
    loss_p, grads_p = loss_and_grads(model, packed)
    assert loss_p == pytest.approx(loss_u, abs=1e-5)
    assert grads_u.keys() == grads_p.keys() and any("vision_model" in n for n in grads_u)
    for name, grad in grads_u.items():
        torch.testing.assert_close(grads_p[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    return loss_u, grads_u


def loss_of(model: Any, b: dict[str, torch.Tensor]) -> torch.Tensor:
    loss_mask = (b["labels"] != -100).float()
    labels = b["labels"].clamp(min=0)
    out, new_mask = model(b["images"], b["input_ids"], b["position_ids"], None, labels=labels, loss_mask=loss_mask)
    return (out * new_mask).sum() / new_mask.sum()


def train_steps(rank: int, world_size: int, steps: int, freeze_llm: bool) -> dict[str, Any]:
    """Init TP=world_size, build the tiny NeVA with seed 1234, run AdamW steps; return losses and weights."""
    from neva_tools.model.parallel import destroy_distributed, init_distributed
    from neva_tools.train.optim import OptimSettings, build_optimizer

    init_distributed(tp=world_size, seed=1234)
    try:
        model = build(world_size, freeze_llm=freeze_llm)
        before = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        optimizer = build_optimizer(model, OptimSettings(lr=1e-3))
        b, losses = batch(), []
        for _ in range(steps):
            optimizer.zero_grad()
            loss = loss_of(model, b)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        after = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        grads = {n for n, p in model.named_parameters() if p.grad is not None}
        state = {n for group in optimizer.param_groups for n in group["names"]}
        meta = {n: (bool(getattr(p, "tensor_model_parallel", False)), int(getattr(p, "partition_dim", -1)))
                for n, p in model.named_parameters()}  # fmt: skip
        return {"losses": losses, "before": before, "after": after, "grads": grads, "state": state, "meta": meta}
    finally:
        destroy_distributed()
