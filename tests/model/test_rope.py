"""RoPE applied by the SDPA core attention equals megatron-core's own RoPE: logits and every gradient."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from neva_tools.model.gpt import build_gpt_model, gpt_model_kwargs, transformer_config_from_nemo
from neva_tools.model.rope import RopeSelfAttention, qkv_to_heads, rope_to_heads, use_rope_self_attention

sys.path.insert(0, str(Path(__file__).parent))
from neva_tiny import TINY_GPT

VOCAB = 128


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


@pytest.mark.parametrize("unused_value", [False, True])
def test_qkv_to_heads_equals_megatron_split_and_rope(dist: None, unused_value: bool) -> None:
    """megatron-core's grouped QKV layout → split, reshape, RoPE, SDPA layout: values and the input gradient
    (also when one output takes no part in the loss and gets no gradient)."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    s, b, groups, hpg, d = 7, 2, 3, 2, 8
    freqs = RotaryEmbedding(kv_channels=d, rotary_percent=1.0, use_cpu_initialization=True)(s).double()
    g = torch.Generator().manual_seed(3)
    mixed = torch.randn(s, b, groups, (hpg + 2) * d, dtype=torch.float64, generator=g, requires_grad=True)
    grads = [torch.randn(b, n, s, d, dtype=torch.float64, generator=g) for n in (groups * hpg, groups, groups)]
    ours = qkv_to_heads(mixed, (freqs, freqs), hpg)
    query, key, value = torch.split(mixed, [hpg * d, d, d], dim=3)
    query = query.reshape(s, b, groups * hpg, d)
    ref = [_apply_rotary_pos_emb_bshd(query, freqs), _apply_rotary_pos_emb_bshd(key, freqs), value]
    ref = [t.permute(1, 2, 0, 3) for t in ref]
    used = 2 if unused_value else 3
    for a, r in zip(ours, ref, strict=True):
        assert a.shape == r.shape and a.is_contiguous()
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    (g_ours,) = torch.autograd.grad(ours[:used], mixed, grads[:used])
    (g_ref,) = torch.autograd.grad(ref[:used], mixed, grads[:used])
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-12)


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


def _spy(function: Any, calls: list[str], name: str) -> Any:
    def spied(*args: Any) -> Any:
        calls.append(name)
        return function(*args)

    return spied


def _loss_and_grads(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = model(tokens, torch.arange(16).expand(2, -1), None, labels=tokens.roll(-1, dims=1))
    loss.mean().backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    ("extra", "path"),
    [
        ({}, "qkv_to_heads"),  # whole-head RoPE on the way from the QKV projection to SDPA
        ({}, "core_attention"),  # megatron's split (QK norms, fewer query groups than TP ranks): RoPE in SDPA
        ({"rotary_percentage": 0.5}, "megatron"),  # partial RoPE: megatron-core's own path
    ],
)
def test_gpt_equals_megatron_rope(dist: None, extra: dict[str, Any], path: str,
                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import neva_tools.model.rope as rope

    cfg = {**TINY_GPT, **extra}
    torch.manual_seed(0)
    ours = build_gpt_model(cfg, padded_vocab_size=VOCAB)
    attention = ours.decoder.layers[0].self_attention
    assert isinstance(attention, RopeSelfAttention) and attention._plain_rope
    assert attention._fused_qkv  # a plain config; partial RoPE leaves it at forward time (frequency width)
    if path == "core_attention":
        for layer in ours.decoder.layers:
            monkeypatch.setattr(layer.self_attention, "_fused_qkv", False)
    calls: list[str] = []
    monkeypatch.setattr(rope._QkvToHeads, "apply", _spy(rope._QkvToHeads.apply, calls, "qkv_to_heads"))
    monkeypatch.setattr(rope._RopeToHeads, "apply", _spy(rope._RopeToHeads.apply, calls, "core_attention"))
    loss, grads = _loss_and_grads(ours)
    layers = TINY_GPT["num_layers"]
    assert calls == {"qkv_to_heads": ["qkv_to_heads"] * layers, "core_attention": ["core_attention"] * 2 * layers,
                     "megatron": []}[path]  # fmt: skip
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
