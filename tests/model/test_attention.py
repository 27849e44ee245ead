"""SDPA core attention equals megatron-core's DotProductAttention on every mask kind it handles."""

from __future__ import annotations

import pytest
import torch

from neva_tools.model.attention import SdpaDotProductAttention, use_sdpa
from neva_tools.model.specs import gpt_local_spec


def _pair(heads: int, groups: int, mask_type: str, scaling: bool = False, layer: int = 3) -> tuple:
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=4, hidden_size=16 * heads, num_attention_heads=heads,
                               num_query_groups=groups, apply_query_key_layer_scaling=scaling,
                               attention_softmax_in_fp32=True, fp16=scaling)  # fmt: skip
    if scaling:  # megatron only honours layer scaling in fp16; compare at fp32 inputs anyway
        config.fp16 = False
    kind = getattr(AttnMaskType, mask_type)
    ref = DotProductAttention(config, layer, kind, "self")
    ours = SdpaDotProductAttention(config, layer, kind, "self")
    return ref.eval(), ours.eval()


def _qkv(sq: int, sk: int, heads: int, groups: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(sq, 2, heads, 16, generator=g), torch.randn(sk, 2, groups, 16, generator=g),
            torch.randn(sk, 2, groups, 16, generator=g))  # fmt: skip


@pytest.mark.parametrize(("heads", "groups"), [(4, 4), (4, 2), (4, 1)])
def test_causal_without_mask_matches(dist: None, heads: int, groups: int) -> None:
    ref, ours = _pair(heads, groups, "causal")
    q, k, v = _qkv(7, 7, heads, groups)
    expected = ref(q, k, v, None)
    got = ours(q, k, v, None)
    assert got.shape == expected.shape == (7, 2, heads * 16)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_explicit_block_diagonal_mask_matches(dist: None) -> None:
    ref, ours = _pair(4, 2, "causal")
    q, k, v = _qkv(8, 8, 4, 2, seed=1)
    segments = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2])
    allowed = (segments[:, None] == segments[None, :]) & torch.ones(8, 8, dtype=torch.bool).tril()
    mask = (~allowed)[None, None].expand(2, 1, 8, 8)
    torch.testing.assert_close(ours(q, k, v, mask), ref(q, k, v, mask), atol=1e-6, rtol=1e-5)


def test_bidirectional_matches(dist: None) -> None:
    ref, ours = _pair(4, 4, "no_mask")
    q, k, v = _qkv(9, 9, 4, 4, seed=2)
    expected = ref(q, k, v, None)
    torch.testing.assert_close(ours(q, k, v, None), expected, atol=1e-6, rtol=1e-5)
    causal_ref, _ = _pair(4, 4, "causal")
    assert not torch.allclose(causal_ref(q, k, v, None), expected)  # the two mask kinds really differ


def test_cached_prefix_is_bottom_right_aligned(dist: None) -> None:
    """Queries for the last 3 of 8 positions (a KV cache holds the first 5) see what full attention gives them."""
    ref, ours = _pair(4, 2, "causal")
    q, k, v = _qkv(8, 8, 4, 2, seed=3)
    full = ref(q, k, v, None)
    torch.testing.assert_close(ours(q[5:], k, v, None), full[5:], atol=1e-6, rtol=1e-5)


def test_query_key_layer_scaling_keeps_the_scale(dist: None) -> None:
    ref, ours = _pair(4, 4, "causal", scaling=True, layer=3)
    q, k, v = _qkv(6, 6, 4, 4, seed=4)
    torch.testing.assert_close(ours(q, k, v, None), ref(q, k, v, None), atol=1e-6, rtol=1e-5)


def test_gradients_match(dist: None) -> None:
    ref, ours = _pair(4, 2, "causal")
    grads = []
    for module in (ref, ours):
        q, k, v = (t.requires_grad_() for t in _qkv(6, 6, 4, 2, seed=5))
        module(q, k, v, None).square().sum().backward()
        grads.append([t.grad for t in (q, k, v)])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_specs_use_sdpa() -> None:
    spec = gpt_local_spec("RMSNorm")
    assert spec.submodules.self_attention.submodules.core_attention is SdpaDotProductAttention
    with pytest.raises(TypeError, match="DotProductAttention"):
        use_sdpa(spec)  # already replaced: refuses to patch an unexpected spec
