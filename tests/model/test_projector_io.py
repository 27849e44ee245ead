"""Stage 1's projector from LLaVA's ``mm_projector.bin`` (and ``.safetensors``): loaded weights equal the file's,
pickles holding code are refused, wrong kinds and shapes are named; a frozen projector (``freeze_mm_mlp_adapter``)
gets no optimizer state and stays bit-identical while the LLM trains."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from neva_tiny import batch, build, loss_of

from neva_tools.errors import NevaError
from neva_tools.mappings.projector import llava_suffix, table
from neva_tools.model import neva_io
from neva_tools.model.neva import freeze


@pytest.fixture(scope="module")
def dist() -> Iterator[None]:
    from dist_helpers import in_process_distributed

    with in_process_distributed(tp=1):
        yield


def _llava_state(model: Any, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The model's projector as LLaVA saves it: ``model.mm_projector.0.weight`` ... ``.2.bias``."""
    local = model.state_dict()
    return {f"{prefix}mm_projector.{llava_suffix(e)}": local[e.nemo].detach().clone() for e in table("mlp2x_gelu")}


def _projector(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.vision_projection.state_dict().items() if "extra" not in k}


def test_mm_projector_bin_loads_bit_exact(dist: None, tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = build(1)
    saved = _llava_state(source)
    torch.save({k: v.bfloat16() for k, v in saved.items()}, tmp_path / "mm_projector.bin")  # LLaVA saves bf16
    torch.manual_seed(2)
    target = build(1)
    fc1 = "encoder.linear_fc1.weight"
    assert not torch.equal(_projector(target)[fc1], _projector(source)[fc1])
    neva_io.load_projector(target, tmp_path / "mm_projector.bin", "mlp2x_gelu", 1, 0)
    loaded = _projector(target)
    for e in table("mlp2x_gelu"):
        key = e.nemo.removeprefix("vision_projection.")
        assert torch.equal(loaded[key], saved[f"model.mm_projector.{llava_suffix(e)}"].bfloat16().float()), key

    from safetensors.torch import save_file

    save_file(_llava_state(source, prefix=""), str(tmp_path / "mm_projector.safetensors"))
    torch.manual_seed(3)
    other = build(1)
    neva_io.load_projector(other, tmp_path / "mm_projector.safetensors", "mlp2x_gelu", 1, 0)
    assert all(torch.equal(a, b) for a, b in zip(_projector(other).values(), _projector(source).values(), strict=True))


class _Payload:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("touch pwned",))


def test_a_pickle_with_code_is_refused(dist: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    torch.save({"model.mm_projector.0.weight": torch.zeros(2), "x": _Payload()}, tmp_path / "mm_projector.bin")
    with pytest.raises(NevaError, match=r"mm_projector\.bin tries to load .*system.*refusing to read it"):
        neva_io.load_projector(build(1), tmp_path / "mm_projector.bin", "mlp2x_gelu", 1, 0)
    assert not (tmp_path / "pwned").exists()


def test_wrong_kind_keys_and_shapes_are_named(dist: None, tmp_path: Path) -> None:
    model = build(1)
    state = _llava_state(model)
    one_layer = {k: v for k, v in state.items() if ".0." in k}
    torch.save(one_layer, tmp_path / "linear.bin")
    with pytest.raises(NevaError, match=r"missing mm_projector\.2\.weight, mm_projector\.2\.bias\); it is a one-layer "
                                        r"projector: set model.mm_cfg.mm_mlp_adapter_type=linear"):  # fmt: skip
        neva_io.load_projector(model, tmp_path / "linear.bin", "mlp2x_gelu", 1, 0)
    torch.save({**state, "model.vision_resampler.w": torch.zeros(1)}, tmp_path / "extra.bin")
    with pytest.raises(NevaError, match=r"keys that are no projector tensor: model\.vision_resampler\.w"):
        neva_io.load_projector(model, tmp_path / "extra.bin", "mlp2x_gelu", 1, 0)
    wide = {k: torch.zeros(v.shape[0], 48) if k.endswith("0.weight") else v for k, v in state.items()}
    torch.save(wide, tmp_path / "wide.bin")
    with pytest.raises(NevaError, match=r"vision hidden size 32 → LLM hidden size 64\): 0\.weight is \[64, 48\], "
                                        r"expected \[64, 32\]"):  # fmt: skip
        neva_io.load_projector(model, tmp_path / "wide.bin", "mlp2x_gelu", 1, 0)


def test_frozen_projector_has_no_optimizer_state_and_stays_bit_identical(dist: None) -> None:
    from neva_tools.model.cpu_compat import model_parallel_seed
    from neva_tools.train import megatron_optim as mo
    from neva_tools.train.optim import OptimSettings

    model_parallel_seed(1234)
    model = build(1, freeze_llm=False)
    freeze(model, llm=False, vision=True, projector=True)
    projector, llm = _projector(model), {k: v.detach().clone() for k, v in model.language_model.named_parameters()}
    chunks = mo.wrap_model(model)
    optimizer = mo.build_optimizer(chunks, OptimSettings(lr=1e-2, projector_lr=1e-1), name="fused_adam")
    assert {g["part"] for g in optimizer.param_groups if g["params"]} == {"llm"}
    for _ in range(2):
        mo.zero_grad(chunks, optimizer)
        mo.scale_loss(optimizer, loss_of(chunks[0], batch())).backward()
        assert mo.optimizer_step(chunks, optimizer).success
    trainable = sum(p.requires_grad for p in model.parameters())
    assert sum(len(inner.state) for inner in mo.torch_optimizers(optimizer)) == trainable == len(llm)
    assert all(torch.equal(v, projector[k]) for k, v in _projector(model).items())
    assert any(not torch.equal(v, llm[k]) for k, v in model.language_model.named_parameters())
    with pytest.raises(NevaError, match="are all true: nothing would train"):
        freeze(build(1), llm=True, vision=True, projector=True)
