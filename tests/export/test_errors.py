"""Bad inputs to ``neva export hf-llava`` are named with the file, the value found and what to do."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from neva_models import build_neva_nemo, build_open_clip

from neva_tools.errors import NevaError
from neva_tools.export.hf_llava import export_hf_llava


def test_not_a_neva_nemo(llm_nemo: Path, tmp_path: Path) -> None:
    with pytest.raises(NevaError, match=r"llm\.nemo is not a NeVA \.nemo.*no mm_cfg.*neva convert nemo-to-hf"):
        export_hf_llava(llm_nemo, tmp_path / "out")


def test_missing_projector(llm_nemo: Path, hf_clip: Path, tmp_path: Path) -> None:
    nemo = build_neva_nemo(llm_nemo, tmp_path / "noproj.nemo", hf_clip, projector=False)
    with pytest.raises(NevaError, match=r"noproj\.nemo has no mlp2x_gelu projector \(missing model\.embedding"):
        export_hf_llava(nemo, tmp_path / "out")


def test_linear_projector_has_no_llava_equivalent(llm_nemo: Path, hf_clip: Path, tmp_path: Path) -> None:
    nemo = build_neva_nemo(llm_nemo, tmp_path / "linear.nemo", hf_clip, adapter="linear")
    with pytest.raises(NevaError, match=r"mm_mlp_adapter_type is 'linear'.*needs mlp2x_gelu"):
        export_hf_llava(nemo, tmp_path / "out")


def test_tokenizer_larger_than_the_vocabulary(llm_nemo: Path, hf_clip: Path, sp_model: Path, tmp_path: Path) -> None:
    nemo = build_neva_nemo(llm_nemo, tmp_path / "bigtok.nemo", hf_clip, tokenizer=sp_model)  # 400 tokens, vocab 300
    with pytest.raises(NevaError, match="has 400 tokens but the LLM's vocabulary is 300"):
        export_hf_llava(nemo, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_output_exists(neva_nemo: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(NevaError, match="already exists; pass --overwrite"):
        export_hf_llava(neva_nemo, tmp_path / "out")
    assert export_hf_llava(neva_nemo, tmp_path / "out", overwrite=True) == tmp_path / "out"


def test_stage1_without_its_llm(llm_nemo: Path, hf_clip: Path, tmp_path: Path) -> None:
    stage1 = build_neva_nemo(llm_nemo, tmp_path / "s1.nemo", hf_clip, include_llm=False)
    with pytest.raises(NevaError, match=r"holds no LLM weights.*missing\.nemo.*does not exist; pass --llm"):
        export_hf_llava(stage1, tmp_path / "out", llm=tmp_path / "missing.nemo")
    with pytest.raises(NevaError, match="holds its own LLM weights"):
        export_hf_llava(build_neva_nemo(llm_nemo, tmp_path / "s2.nemo", hf_clip), tmp_path / "out", llm=llm_nemo)


def test_vision_tower_that_does_not_fit(neva_nemo: Path, tmp_path: Path) -> None:
    with pytest.raises(NevaError, match=r"--vision .*missing_clip does not exist"):
        export_hf_llava(neva_nemo, tmp_path / "out", vision=tmp_path / "missing_clip")
    other = build_open_clip(tmp_path / "clip64", width=64)
    with pytest.raises(NevaError, match=r"projector's first layer has shape \(64, 32\).*hidden size 64"):
        export_hf_llava(neva_nemo, tmp_path / "out", vision=other)


def test_siglip_tower_is_read_by_its_table(tmp_path: Path) -> None:
    """A SigLIP tower (once refused) is read with the SigLIP table: no class token or pre-norm, its pooling head
    (not built by the exported SiglipVisionModel) left out, a wrong tensor named."""
    from safetensors.torch import load_file, save_file
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from neva_tools.export.vision import read_tower
    from neva_tools.mappings.siglip import SiglipVisionArch

    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                             image_size=28, patch_size=7)  # fmt: skip
    SiglipVisionModel(cfg).save_pretrained(str(tmp_path / "siglip"))
    tower = read_tower(str(tmp_path / "siglip"))
    assert isinstance(tower.arch, SiglipVisionArch) and tower.arch.num_patches == 16
    assert "embeddings.patch_embedding.bias" in tower.state and "post_layernorm.weight" in tower.state
    assert not any(k.startswith("head.") or "class_embedding" in k for k in tower.state)
    state = load_file(str(tmp_path / "siglip" / "model.safetensors"))
    state["vision_model.extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "siglip" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(NevaError, match=r"does not match a 1-layer SigLIP ViT \(unknown: extra.weight\)"):
        read_tower(str(tmp_path / "siglip"))
