"""Plain linears at TP 1 equal megatron-core's Column/RowParallelLinear; at TP 2 megatron-core's path is kept."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from neva_tools.model.gpt import transformer_config_from_nemo
from neva_tools.model.linear import Tp1ColumnParallelLinear, Tp1RowParallelLinear, use_tp1_linears

sys.path.insert(0, str(Path(__file__).parent))
from dist_helpers import run_distributed
from neva_tiny import TINY_GPT


def _pair(kind: str, bias: bool, skip_bias_add: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    config = transformer_config_from_nemo(TINY_GPT)
    ref_cls, ours_cls = {"column": (ColumnParallelLinear, Tp1ColumnParallelLinear),
                         "row": (RowParallelLinear, Tp1RowParallelLinear)}[kind]  # fmt: skip
    extra = {"gather_output": False} if kind == "column" else {"input_is_parallel": True}
    layers = []
    for cls in (ref_cls, ours_cls):
        torch.manual_seed(0)
        layers.append(cls(24, 40, config=config, init_method=config.init_method, bias=bias,
                          skip_bias_add=skip_bias_add, **extra))  # fmt: skip
    with torch.no_grad():
        if bias:
            layers[0].bias.normal_()
        layers[1].load_state_dict(layers[0].state_dict())
    return layers[0], layers[1]


@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize(("bias", "skip_bias_add"), [(False, False), (True, False), (True, True)])
def test_equals_megatron_linear(dist: None, kind: str, bias: bool, skip_bias_add: bool) -> None:
    ref, ours = _pair(kind, bias, skip_bias_add)
    assert ours._single_rank
    x = torch.randn(5, 2, 24, generator=torch.Generator().manual_seed(1))
    grads = []
    for layer in (ref, ours):
        inp = x.clone().requires_grad_()
        out, out_bias = layer(inp)
        assert (out_bias is not None) == (bias and skip_bias_add)
        total = out if out_bias is None else out + out_bias
        total.square().sum().backward()
        grads.append((out.detach(), inp.grad, {n: p.grad for n, p in layer.named_parameters()}))
    (o_r, gi_r, gp_r), (o_o, gi_o, gp_o) = grads
    torch.testing.assert_close(o_o, o_r, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gi_o, gi_r, rtol=1e-6, atol=1e-6)
    for name in gp_r:
        torch.testing.assert_close(gp_o[name], gp_r[name], rtol=1e-5, atol=1e-6, msg=name)


def test_frozen_weight_gets_no_gradient(dist: None) -> None:
    _, ours = _pair("column", bias=False, skip_bias_add=False)
    ours.weight.requires_grad_(False)
    inp = torch.randn(3, 1, 24, requires_grad=True)
    ours(inp)[0].sum().backward()
    assert ours.weight.grad is None and inp.grad is not None


def _single_rank_flags(rank: int, world_size: int) -> list[bool]:
    from neva_tools.model.gpt import build_gpt_model
    from neva_tools.model.parallel import destroy_distributed, init_distributed

    init_distributed(tp=world_size, seed=1234)
    try:
        model = build_gpt_model({**TINY_GPT, "tensor_model_parallel_size": world_size}, padded_vocab_size=256)
        return [
            m._single_rank for m in model.modules() if isinstance(m, Tp1ColumnParallelLinear | Tp1RowParallelLinear)
        ]
    finally:
        destroy_distributed()


def test_tp2_keeps_megatron_path() -> None:
    flags = run_distributed(_single_rank_flags, 2)
    assert all(len(f) == 4 * TINY_GPT["num_layers"] and not any(f) for f in flags)


def test_spec_swap_refuses_an_unexpected_spec() -> None:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = use_tp1_linears(get_gpt_layer_local_spec(normalization="RMSNorm"))
    assert spec.submodules.mlp.submodules.linear_fc1 is Tp1ColumnParallelLinear
    with pytest.raises(TypeError, match="linear_qkv"):
        use_tp1_linears(spec)
