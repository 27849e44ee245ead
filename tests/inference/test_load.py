"""Loading a NeVA ``.nemo`` for inference: where each part comes from, and the errors that name the fix."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_helpers import in_process_distributed

from neva_tools.errors import NevaError
from neva_tools.inference.load import LoadedNeva, load_neva, neva_config, stores_llm


@pytest.fixture(scope="module")
def session() -> Iterator[None]:
    with in_process_distributed():
        yield


def _state(model: Any, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.startswith(prefix) and not k.endswith("_extra_state")}


def _projector_only(loaded: LoadedNeva, config: dict[str, Any], out: Path) -> Path:
    from neva_tools.model.neva_io import save_neva_nemo

    save_neva_nemo(loaded.model, out, config, include_llm=False, projector_type="mlp2x_gelu",
                   tokenizer=loaded.tokenizer.path)  # fmt: skip
    return out


def test_frozen_llm_archive_takes_the_llm_from_its_config(session: None, neva_run: dict[str, Any],
                                                          tmp_path: Path) -> None:  # fmt: skip
    trained = load_neva(neva_run["nemo"])
    assert stores_llm(neva_run["nemo"]) and trained.template == "vicuna_v1"
    stage1 = _projector_only(trained, neva_config(neva_run["nemo"]), tmp_path / "stage1.nemo")
    assert not stores_llm(stage1)
    frozen = load_neva(stage1)
    base = load_neva(neva_run["nemo"], llm=neva_run["llm"])  # --llm: the original LLM with the trained projector
    for prefix in ("language_model.", "vision_projection.", "vision_model."):
        a, b = _state(frozen.model, prefix), _state(base.model, prefix)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), prefix
    llm_a, llm_t = _state(frozen.model, "language_model."), _state(trained.model, "language_model.")
    assert any(not torch.equal(llm_a[k], llm_t[k]) for k in llm_a)  # stage 2 changed the LLM; stage 1 kept it
    proj_a, proj_t = _state(frozen.model, "vision_projection."), _state(trained.model, "vision_projection.")
    assert all(torch.equal(proj_a[k], proj_t[k]) for k in proj_a)

    moved = neva_config(neva_run["nemo"])
    moved["mm_cfg"]["llm"]["from_pretrained"] = str(tmp_path / "gone.nemo")
    orphan = _projector_only(trained, moved, tmp_path / "orphan.nemo")
    with pytest.raises(NevaError, match=r"holds no LLM weights .*/gone.nemo' does not exist; pass --llm"):
        load_neva(orphan)


def test_vision_override_is_checked(session: None, neva_run: dict[str, Any], tmp_path: Path) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    big = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           image_size=56, patch_size=7)  # fmt: skip
    CLIPVisionModel(big).save_pretrained(str(tmp_path / "clip56"))
    with pytest.raises(NevaError, match=r"takes 56px images in 7px patches but .* was trained with 28px / 7px"):
        load_neva(neva_run["nemo"], vision=tmp_path / "clip56")
    with pytest.raises(NevaError, match=r"vision encoder .*missing \(from --vision\) does not exist"):
        load_neva(neva_run["nemo"], vision=tmp_path / "missing")
    with pytest.raises(NevaError, match="unknown conversation template 'vicuna'"):
        load_neva(neva_run["nemo"], template="vicuna")
