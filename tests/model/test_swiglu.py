"""The single-function SwiGLU MLP equals megatron-core's MLP: outputs and every gradient."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from neva_tools.model.gpt import transformer_config_from_nemo
from neva_tools.model.swiglu import LinearSwiGLU, SwiGLU, SwiGluMLP, use_swiglu_mlp

sys.path.insert(0, str(Path(__file__).parent))
from neva_tiny import TINY_GPT


def test_function_matches_chunked_reference() -> None:
    y = torch.randn(5, 3, 2 * 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SwiGLU.apply, (y,))
    grad = torch.randn(5, 3, 7, dtype=torch.float64)
    ours = SwiGLU.apply(y)
    (g_ours,) = torch.autograd.grad(ours, y, grad)
    gate, up = torch.chunk(y, 2, dim=-1)
    ref = F.silu(gate) * up
    (g_ref,) = torch.autograd.grad(ref, y, grad)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-12)


def test_linear_function_matches_linear_then_swiglu() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(2 * 6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(LinearSwiGLU.apply, (x, weight))
    grad = torch.randn(4, 3, 6, dtype=torch.float64, generator=g)
    ours = LinearSwiGLU.apply(x, weight)
    gate, up = torch.chunk(F.linear(x, weight), 2, dim=-1)
    ref = F.silu(gate) * up
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(ours, (x, weight), grad), torch.autograd.grad(ref, (x, weight), grad)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    frozen = weight.detach()  # a frozen LLM: only the input gets a gradient
    (g_x,) = torch.autograd.grad(LinearSwiGLU.apply(x, frozen), (x,), grad)
    torch.testing.assert_close(g_x, grads[1][0], rtol=1e-12, atol=1e-12)


def _pair(config: object, tp1_linears: bool = False) -> tuple[torch.nn.Module, torch.nn.Module]:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.mlp import MLP

    from neva_tools.model.specs import gpt_local_spec

    submodules = get_gpt_layer_local_spec(normalization="RMSNorm").submodules.mlp.submodules
    torch.manual_seed(0)
    ref = MLP(config, submodules)
    ours = SwiGluMLP(config, gpt_local_spec("RMSNorm").submodules.mlp.submodules if tp1_linears else submodules)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize(("gated", "tp1_linears"), [(True, False), (True, True), (False, False)])
def test_mlp_equals_megatron_mlp(dist: None, gated: bool, tp1_linears: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Equal outputs and gradients: SwiGLU after megatron's fc1, SwiGLU with fc1 inside (plain linear at TP 1),
    and megatron's own forward for a non-gated MLP."""
    config = transformer_config_from_nemo(TINY_GPT if gated else {**TINY_GPT, "activation": "gelu"})
    ref, ours = _pair(config, tp1_linears)
    assert ours._plain_swiglu is gated  # gelu (not gated) goes to megatron-core's own forward
    assert getattr(ours.linear_fc1, "_single_rank", False) is tp1_linears
    calls: list[str] = []

    def spy(cls: type) -> Any:
        def forward(ctx: Any, *args: Any) -> torch.Tensor:
            calls.append(cls.__name__)
            return original(ctx, *args)

        original = cls.forward
        return staticmethod(forward)

    for cls in (SwiGLU, LinearSwiGLU):
        monkeypatch.setattr(cls, "forward", spy(cls))
    x = torch.randn(6, 2, config.hidden_size, generator=torch.Generator().manual_seed(1))
    results = []
    for module in (ref, ours):
        inp = x.clone().requires_grad_()
        out, bias = module(inp)
        assert bias is None
        out.square().sum().backward()
        results.append((out.detach(), inp.grad, {n: p.grad for n, p in module.named_parameters()}))
    (out_r, gin_r, gp_r), (out_o, gin_o, gp_o) = results
    assert calls == ([] if not gated else ["LinearSwiGLU"] if tp1_linears else ["SwiGLU"])
    torch.testing.assert_close(out_o, out_r, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gin_o, gin_r, rtol=1e-6, atol=1e-6)
    assert gp_o.keys() == gp_r.keys()
    for name in gp_r:
        torch.testing.assert_close(gp_o[name], gp_r[name], rtol=1e-5, atol=1e-6, msg=name)


def test_offset_glu_goes_to_megatron_forward(dist: None) -> None:
    config = dataclasses.replace(transformer_config_from_nemo(TINY_GPT), glu_linear_offset=1.0)
    ref, ours = _pair(config)
    assert not ours._plain_swiglu
    x = torch.randn(4, 2, config.hidden_size)
    torch.testing.assert_close(ours(x)[0], ref(x)[0])


def test_spec_swap_refuses_an_unexpected_spec() -> None:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = use_swiglu_mlp(get_gpt_layer_local_spec(normalization="RMSNorm"))
    assert spec.submodules.mlp.module is SwiGluMLP
    with pytest.raises(TypeError, match="dense megatron-core MLP"):
        use_swiglu_mlp(spec)


def test_building_a_gpt_logs_no_unknown_mlp_warning(dist: None, caplog: pytest.LogCaptureFixture) -> None:
    from neva_tools.model.gpt import build_gpt_model

    with caplog.at_level("WARNING"):
        model = build_gpt_model(TINY_GPT, padded_vocab_size=128)
    assert isinstance(model.decoder.layers[0].mlp, SwiGluMLP)
    assert not [r for r in caplog.records if "Unknown MLP type" in r.getMessage()]


@pytest.mark.parametrize("kind", ["pre_hook", "hook", "global_pre_hook"])
def test_hooks_on_linear_fc1_run_and_leave_the_result(dist: None, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward (pre-)hook on ``linear_fc1`` (megatron-core DDP's param all-gather wait, with
    ``overlap_param_gather``), or a global one, makes the TP-1 MLP call ``linear_fc1`` instead of fusing it into
    :class:`LinearSwiGLU`: the hook runs once per forward and the output and gradients stay the same."""
    config = transformer_config_from_nemo(TINY_GPT)
    _, ours = _pair(config, tp1_linears=True)
    fc1 = ours.linear_fc1
    assert fc1._single_rank and fc1.bias is None
    fused: list[int] = []
    original = LinearSwiGLU.forward

    def spy(ctx: Any, *args: Any) -> torch.Tensor:
        fused.append(1)
        return original(ctx, *args)

    monkeypatch.setattr(LinearSwiGLU, "forward", staticmethod(spy))
    x = torch.randn(6, 2, config.hidden_size, generator=torch.Generator().manual_seed(1))

    def run() -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        ours.zero_grad()
        inp = x.clone().requires_grad_()
        out, _ = ours(inp)
        out.square().sum().backward()
        return out.detach(), inp.grad, {n: p.grad.clone() for n, p in ours.named_parameters()}

    plain = run()
    assert fused == [1]  # no hooks: the fused path
    seen: list[torch.nn.Module] = []

    def record(module: torch.nn.Module, *unused: Any) -> None:
        seen.append(module)

    if kind == "global_pre_hook":
        handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    else:
        handle = fc1.register_forward_pre_hook(record) if kind == "pre_hook" else fc1.register_forward_hook(record)
    try:
        hooked = run()
    finally:
        handle.remove()
    assert fused == [1]  # the module was called, not fused
    assert fc1 in seen and (kind == "global_pre_hook" or seen == [fc1])
    for a, b in zip(hooked[:2], plain[:2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for name in plain[2]:
        torch.testing.assert_close(hooked[2][name], plain[2][name], rtol=1e-5, atol=1e-6, msg=name)
    run()
    assert fused == [1, 1]  # hooks removed: fused again
