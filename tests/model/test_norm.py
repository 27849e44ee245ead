"""The CPU-trained RMSNorm equals torch.nn.RMSNorm (values and gradients) and is what the GPT specs build."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from neva_tools.model.gpt import transformer_config_from_nemo
from neva_tools.model.norm import RMSNorm, TorchNorm, rms_norm, use_torch_norm

sys.path.insert(0, str(Path(__file__).parent))
from neva_tiny import TINY_GPT


def test_function_gradcheck_and_reference() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 8, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(8, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: rms_norm(a, w, 1e-5), (x, weight))
    torch.testing.assert_close(rms_norm(x, weight, 1e-5), torch.rms_norm(x, [8], weight, 1e-5), rtol=0, atol=1e-12)


def _modules(eps: float | None) -> tuple[torch.nn.Module, torch.nn.Module]:
    ref = torch.nn.RMSNorm(64, eps=eps)
    with torch.no_grad():
        ref.weight.normal_(generator=torch.Generator().manual_seed(1))
    ours = RMSNorm(64, eps=eps)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("eps", [1e-5, None])
@pytest.mark.parametrize("frozen", [False, True])
def test_module_equals_torch_rmsnorm(eps: float | None, frozen: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    ref, ours = _modules(eps)
    calls = []
    monkeypatch.setattr("neva_tools.model.norm.rms_norm", lambda *a: calls.append(1) or rms_norm(*a))
    x = torch.randn(7, 3, 64, generator=torch.Generator().manual_seed(2)) * 3
    grad = torch.randn(7, 3, 64, generator=torch.Generator().manual_seed(3))
    results = []
    for module in (ref, ours):
        module.weight.requires_grad_(not frozen)
        inp = x.clone().requires_grad_()
        out = module(inp)
        out.backward(grad)
        results.append((out.detach(), inp.grad, module.weight.grad))
    assert calls == [1]  # float32 with gradients: our function
    (o_r, gx_r, gw_r), (o_o, gx_o, gw_o) = results
    torch.testing.assert_close(o_o, o_r, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx_o, gx_r, rtol=1e-5, atol=1e-5)
    if frozen:
        assert gw_o is None and gw_r is None
    else:
        torch.testing.assert_close(gw_o, gw_r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["no_grad", "bfloat16", "float64"])
def test_other_cases_are_torch_rmsnorm(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ref, ours = _modules(1e-5)
    monkeypatch.setattr("neva_tools.model.norm.rms_norm", lambda *a: pytest.fail("took the float32 training path"))
    x = torch.randn(5, 64)
    if case != "no_grad":
        dtype = {"bfloat16": torch.bfloat16, "float64": torch.float64}[case]
        ref, ours, x = ref.to(dtype), ours.to(dtype), x.to(dtype)
    with torch.set_grad_enabled(case != "no_grad"):
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)


def test_spec_entries_and_built_model(dist: None) -> None:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from neva_tools.model.gpt import build_gpt_model

    rms = transformer_config_from_nemo(TINY_GPT)
    layer = transformer_config_from_nemo({**TINY_GPT, "normalization": "layernorm", "activation": "gelu"})
    assert type(TorchNorm(rms, 64, 1e-5)) is RMSNorm
    assert type(TorchNorm(layer, 64, 1e-5)) is torch.nn.LayerNorm  # WrappedTorchNorm's choice for the rest
    spec = use_torch_norm(get_gpt_layer_local_spec(normalization="RMSNorm"))
    assert spec.submodules.input_layernorm is TorchNorm and spec.submodules.pre_mlp_layernorm is TorchNorm

    model = build_gpt_model(TINY_GPT, padded_vocab_size=128)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.RMSNorm)]
    assert len(norms) == 2 * TINY_GPT["num_layers"] + 1  # the final norm too
    assert all(type(m) is RMSNorm for m in norms)
    assert "decoder.final_layernorm.weight" in model.state_dict()
