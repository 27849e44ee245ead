"""RoPE applied by the SDPA core attention equals megatron-core's own RoPE: logits and every gradient."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from neva_tools.model.gpt import build_gpt_model, gpt_model_kwargs, transformer_config_from_nemo
from neva_tools.model.rope import RopeSelfAttention, rope_to_heads, use_rope_self_attention

sys.path.insert(0, str(Path(__file__).parent))
from dist_helpers import in_process_distributed
from neva_tiny import TINY_GPT

VOCAB = 128


@pytest.fixture(scope="module")
def dist() -> Iterator[None]:
    with in_process_distributed(tp=1):
        yield


@pytest.mark.parametrize("strided", [False, True])
def test_rope_to_heads_equals_megatron_rope(dist: None, strided: bool) -> None:
    """Values and gradients equal megatron's RoPE followed by the move to ``[b, heads, s, d]``, also for a strided
    input (a slice of a fused QKV projection, as attention gets it)."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    freqs = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, use_cpu_initialization=True)(12)  # [s, 1, 1, d]
    g = torch.Generator().manual_seed(0)
    base = torch.randn(12, 2, 3, 32 if strided else 16, dtype=torch.float64, generator=g, requires_grad=True)
    t = base[..., 8:24] if strided else base
    grad = torch.randn(2, 3, 12, 16, dtype=torch.float64, generator=g)
    ours = rope_to_heads(t, freqs.double())
    assert ours.shape == (2, 3, 12, 16) and ours.is_contiguous()
    (g_ours,) = torch.autograd.grad(ours, base, grad)
    ref = _apply_rotary_pos_emb_bshd(t, freqs.double()).permute(1, 2, 0, 3)
    (g_ref,) = torch.autograd.grad(ref, base, grad)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-12)
    if strided:
        assert g_ours[..., :8].abs().max() == 0 and g_ours[..., 24:].abs().max() == 0


def _reference(cfg: dict[str, Any], ours: torch.nn.Module) -> torch.nn.Module:
    """The same GPT with megatron-core's SelfAttention (RoPE applied by megatron) and ``ours``' weights."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from neva_tools.model.attention import use_sdpa

    spec = use_sdpa(get_gpt_layer_local_spec(normalization="RMSNorm"))
    ref = GPTModel(config=transformer_config_from_nemo(cfg), transformer_layer_spec=spec, vocab_size=VOCAB,
                   parallel_output=True, **gpt_model_kwargs(cfg))  # fmt: skip
    ref.load_state_dict(ours.state_dict())
    return ref


def _loss_and_grads(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = model(tokens, torch.arange(16).expand(2, -1), None, labels=tokens.roll(-1, dims=1))
    loss.mean().backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("rotary_percentage", [1.0, 0.5])  # 0.5: partial RoPE goes to megatron-core's path
def test_gpt_equals_megatron_rope(dist: None, rotary_percentage: float) -> None:
    cfg = {**TINY_GPT, "rotary_percentage": rotary_percentage}
    torch.manual_seed(0)
    ours = build_gpt_model(cfg, padded_vocab_size=VOCAB)
    attention = ours.decoder.layers[0].self_attention
    assert isinstance(attention, RopeSelfAttention) and attention._plain_rope
    calls: list[int] = []
    handle = attention.core_attention.register_forward_pre_hook(lambda m, args: calls.append(int(m.rotary is not None)))
    loss, grads = _loss_and_grads(ours)
    handle.remove()
    assert calls == [1 if rotary_percentage == 1.0 else 0]  # whole-head RoPE is left to the core attention
    ref_loss, ref_grads = _loss_and_grads(_reference(cfg, ours))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_interleaved_rope_is_not_taken_over(dist: None) -> None:
    import dataclasses

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    config = dataclasses.replace(transformer_config_from_nemo(TINY_GPT), rotary_interleaved=True)
    spec = use_rope_self_attention(get_gpt_layer_local_spec(normalization="RMSNorm"))
    from megatron.core.transformer.spec_utils import build_module

    attention = build_module(spec.submodules.self_attention, config=config, layer_number=1)
    assert isinstance(attention, RopeSelfAttention) and not attention._plain_rope


def test_spec_swap_refuses_an_unexpected_spec() -> None:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = use_rope_self_attention(get_gpt_layer_local_spec(normalization="RMSNorm"))
    with pytest.raises(TypeError, match="SelfAttention"):
        use_rope_self_attention(spec)


def test_cos_sin_cached_per_frequency_tensor() -> None:
    from neva_tools.model.rope import _cos_sin

    freqs = torch.rand(6, 1, 1, 8)
    cos, sin = _cos_sin(freqs, torch.float32)
    torch.testing.assert_close(cos, torch.cos(freqs).permute(1, 2, 0, 3), rtol=0, atol=0)
    torch.testing.assert_close(sin, torch.sin(freqs).permute(1, 2, 0, 3), rtol=0, atol=0)
    assert _cos_sin(freqs, torch.float32)[0] is cos  # same tensor: reused
    assert _cos_sin(freqs.clone(), torch.float32)[0] is not cos  # another tensor
    assert _cos_sin(freqs, torch.float64)[0].dtype == torch.float64
    freqs.mul_(2)  # modified in place: recomputed
    torch.testing.assert_close(_cos_sin(freqs, torch.float32)[0], torch.cos(freqs).permute(1, 2, 0, 3))
    with torch.inference_mode():
        assert _cos_sin(freqs, torch.float32)[0].is_inference()
    t = torch.randn(6, 1, 2, 8, requires_grad=True)
    rope_to_heads(t, freqs).sum().backward()  # after inference mode: values that can be saved for backward
    assert t.grad is not None
