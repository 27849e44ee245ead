"""NeMo's architecture keys are checked against the checkpoints: a disagreement names the key and both values."""

from __future__ import annotations

from pathlib import Path

from neva_tools.config import derived
from neva_tools.config.load import load_config
from neva_tools.mappings.clip import ClipVisionArch
from neva_tools.mappings.siglip import SiglipVisionArch

#: A LLaMA-style .nemo config (NeMo's key names), as the LLM reader returns it.
LLM = {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 96, "num_attention_heads": 4, "num_query_groups": 2,
       "encoder_seq_length": 256, "max_position_embeddings": 256, "position_embedding_type": "rope",
       "normalization": "rmsnorm", "layernorm_epsilon": 1e-5, "bias": False, "activation": "fast-swiglu",
       "share_embeddings_and_output_weights": False}  # fmt: skip
CLIP = ClipVisionArch(image_size=28, patch_size=7, hidden_size=32, num_layers=3, num_heads=4, ffn_hidden_size=64)


def test_llm_keys_that_agree_pass_and_those_that_disagree_name_both() -> None:
    agree = load_config(None, ["model.num_layers=2", "model.hidden_size=64", "model.activation=swiglu",
                               "model.num_query_groups=2", "model.kv_channels=16", "model.rotary_percentage=1.0",
                               "model.layernorm_epsilon=1e-5", "model.bias=false"])  # fmt: skip
    assert derived.llm_problems(agree, "llm.nemo", LLM) == []
    seed_like = load_config(None, ["model.num_layers=40", "model.hidden_size=5120", "model.rotary_percentage=0.5",
                                   "model.normalization=layernorm1p"])  # fmt: skip
    problems = derived.llm_problems(seed_like, "llm.nemo", LLM)
    assert len(problems) == 4
    assert problems[0] == ("model.num_layers is 40 in the config but the LLM llm.nemo has 2: the LLM's architecture "
                           "comes from its .nemo; delete the key or set it to 2")  # fmt: skip
    assert any("model.rotary_percentage is 0.5" in p and "has 1.0" in p for p in problems)
    gqa_default = dict(LLM, num_query_groups=None)  # null in the .nemo: as many groups as heads
    assert derived.llm_problems(load_config(None, ["model.num_query_groups=4"]), "x", gqa_default) == []


def test_vision_keys_against_the_encoder(tmp_path: Path) -> None:
    ok = load_config(None, ["model.mm_cfg.vision_encoder.patch_dim=7", "model.mm_cfg.vision_encoder.hidden_size=32",
                            "model.mm_cfg.vision_encoder.crop_size=[28,28]", "model.data.image_token_len=16",
                            "model.mm_cfg.vision_encoder.class_token_length=1"])  # fmt: skip
    assert derived.vision_problems(ok, CLIP) == []
    nemo_defaults = load_config(None, ["model.mm_cfg.vision_encoder.hidden_size=1024",
                                       "model.data.image_token_len=256",
                                       "model.mm_cfg.vision_encoder.class_token_length=1"])  # fmt: skip
    problems = derived.vision_problems(nemo_defaults, CLIP)
    assert len(problems) == 2 and "model.mm_cfg.vision_encoder.hidden_size is 1024" in problems[0]
    assert "model.data.image_token_len is 256 in the config but the vision encoder None has 16" in problems[1]
    siglip = SiglipVisionArch(image_size=28, patch_size=7, hidden_size=32, num_layers=2, num_heads=4,
                              ffn_hidden_size=64)  # fmt: skip
    found = derived.vision_problems(nemo_defaults, siglip)
    assert any("class_token_length is 1 in the config but the vision encoder None has 0" in p for p in found)


def test_from_hf_must_name_a_hugging_face_directory(tmp_path: Path) -> None:
    (tmp_path / "oc").mkdir()
    (tmp_path / "oc" / "open_clip_config.json").write_text("{}")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    wrong = load_config(None, [f"model.mm_cfg.vision_encoder.from_pretrained={tmp_path / 'oc'}",
                               "model.mm_cfg.vision_encoder.from_hf=true"])  # fmt: skip
    assert "from_hf is true but from_pretrained" in derived.from_hf_problems(wrong)[0]
    assert "an open_clip directory; set from_hf: false" in derived.from_hf_problems(wrong)[0]
    name = load_config(None, ["model.mm_cfg.vision_encoder.from_pretrained=ViT-B-16:w.pt",
                              "model.mm_cfg.vision_encoder.from_hf=true"])  # fmt: skip
    assert "open_clip NAME:CHECKPOINT" in derived.from_hf_problems(name)[0]
    right = load_config(None, [f"model.mm_cfg.vision_encoder.from_pretrained={tmp_path / 'hf'}",
                               "model.mm_cfg.vision_encoder.from_hf=true"])  # fmt: skip
    assert derived.from_hf_problems(right) == []
