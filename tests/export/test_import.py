"""``neva import hf-llava``: import(export(x)) is x tensor for tensor; llava-hf layouts and configs are read."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from builders import build_tiny_llm, caption_corpus
from dist_helpers import in_process_distributed
from neva_models import build_neva_nemo, expand_images, hf_logits, our_logits, safetensors_of, state_of

from neva_tools.checkpoint.nemo_archive import NemoArchive
from neva_tools.errors import NevaError
from neva_tools.export.hf_llava import export_hf_llava
from neva_tools.export.import_llava import import_hf_llava, read_llava_config
from neva_tools.export.vision import NEMO_VISION_PREFIX

#: llava-hf/llava-1.5-7b-hf's config.json as published (transformers 4.36): every default left out.
LLAVA_15_7B = {
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
    "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                    "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                    "torch_dtype": "float16", "vocab_size": 32064},
    "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064,
}  # fmt: skip
LLAVA_15_13B_TEXT = {"hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40,
                     "num_hidden_layers": 40, "num_key_value_heads": 40}  # fmt: skip


def test_llava_15_configs_are_read_with_transformers_defaults() -> None:
    arch, vision, layer, _ = read_llava_config(LLAVA_15_7B, "llava-1.5-7b-hf")
    assert (arch.hidden_size, arch.num_layers, arch.num_heads, arch.num_groups) == (4096, 32, 32, 32)
    assert (arch.ffn_hidden_size, arch.vocab_size, arch.norm_eps, arch.tied) == (11008, 32064, 1e-5, False)
    assert (vision.image_size, vision.patch_size, vision.num_layers, vision.hidden_size) == (336, 14, 24, 1024)
    assert vision.activation == "quick_gelu" and vision.num_patches == 576 and layer == -2
    cfg13 = {**LLAVA_15_7B, "text_config": {**LLAVA_15_7B["text_config"], **LLAVA_15_13B_TEXT}}
    arch13, _, _, _ = read_llava_config(cfg13, "llava-1.5-13b-hf")
    assert (arch13.hidden_size, arch13.num_layers, arch13.num_heads, arch13.ffn_hidden_size) == (5120, 40, 40, 13824)


@pytest.mark.parametrize(("change", "message"), [
    ({"model_type": "llama"}, "model_type 'llama' is not 'llava'"),
    ({"vision_feature_select_strategy": "full"}, "vision_feature_select_strategy 'full' is not supported"),
    ({"vision_feature_layer": [-2, -5]}, "several layers"),
    ({"vision_feature_layer": -30}, "must pick a transformer layer output of the 24-layer"),
])  # fmt: skip
def test_unsupported_configs(change: dict, message: str) -> None:
    with pytest.raises(NevaError, match=message):
        read_llava_config({**LLAVA_15_7B, **change}, "config.json")


def test_import_of_export_is_the_original_at_tp2(neva_tp2: Path, exported_tp2: Path, hf_clip: Path,
                                                 export_root: Path) -> None:  # fmt: skip
    back = import_hf_llava(exported_tp2, export_root / "back_tp2.nemo", tp=2)
    clip = {f"{NEMO_VISION_PREFIX}vision_model.{k}": v for k, v in safetensors_of(hf_clip).items()}
    clip = {k: v for k, v in clip.items() if not k.endswith("position_ids")}
    for rank in range(2):
        original, imported = state_of(neva_tp2, rank), state_of(back, rank)
        assert (
            original.keys() <= imported.keys() and len(original) == 19
        )  # 2 layers × 7, embedding, norm, output, 4 projector
        assert all(torch.equal(original[k], imported[k]) for k in original)  # LLM shards and projector
        extra = {k: imported[k] for k in imported.keys() - original.keys()}
        assert extra.keys() == clip.keys() and all(torch.equal(extra[k], clip[k]) for k in clip)  # the CLIP tower


def test_export_of_import_is_the_original(exported: Path, export_root: Path) -> None:
    nemo = import_hf_llava(exported, export_root / "imported.nemo")
    again = export_hf_llava(nemo, export_root / "hf_again")  # needs nothing but the .nemo
    a, b = safetensors_of(exported), safetensors_of(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("config.json", "tokenizer.json", "chat_template.jinja", "processor_config.json"):
        assert (exported / name).read_text() == (again / name).read_text(), name


@pytest.fixture(scope="module")
def dist() -> Iterator[None]:
    with in_process_distributed(tp=1):
        yield


def test_imported_model_trains_from_its_nemo(dist: None, exported: Path, export_root: Path) -> None:
    """The imported .nemo and --vision-dir load into our LLaVAModel (as neva train does) with the HF logits."""
    nemo = import_hf_llava(exported, export_root / "imported_vis.nemo", vision_dir=export_root / "imported_clip")
    with NemoArchive(nemo) as archive:
        mm = archive.read_config()["mm_cfg"]
    assert mm["vision_encoder"]["from_pretrained"] == str((export_root / "imported_clip").resolve())
    assert mm["llm"]["from_pretrained"] == mm["pretrain_mm_mlp_adapter"] == str(nemo.resolve())
    g = torch.Generator().manual_seed(5)
    ids = [1, 5, 17, -200, 30, 41, 52, 2]
    pixels = torch.randn(1, 3, 28, 28, generator=g)
    ours = our_logits(0, 1, str(nemo), str(export_root / "imported_clip"), torch.tensor([ids]), pixels)
    theirs = hf_logits(exported, torch.tensor([expand_images(ids, 300, 16)]), pixels)
    assert (ours - theirs[..., :300]).abs().max().item() <= 1e-4


def test_transformers5_layout_is_read(exported: Path, export_root: Path) -> None:
    """transformers 5 names (model.language_model.*, model.vision_tower.*, lm_head) import like llava-hf's."""
    from safetensors.torch import save_file

    v5 = export_root / "hf_v5"
    shutil.copytree(exported, v5)
    renames = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
               ("vision_tower.vision_model.", "model.vision_tower."),
               ("multi_modal_projector.", "model.multi_modal_projector."))  # fmt: skip
    state = {}
    for name, tensor in safetensors_of(exported).items():
        old, new = next((o, n) for o, n in renames if name.startswith(o))
        state[new + name[len(old) :]] = tensor
    save_file(state, str(v5 / "model.safetensors"), metadata={"format": "pt"})
    a = state_of(import_hf_llava(v5, export_root / "from_v5.nemo"))
    b = state_of(import_hf_llava(exported, export_root / "from_v4.nemo"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_image_token_inside_the_vocabulary(llm_nemo: Path, hf_clip: Path, export_root: Path) -> None:
    """A tokenizer smaller than the LLM vocabulary: <image> takes a free id, no row is appended."""
    from neva_tools.convert.hf_to_nemo import convert_hf_to_nemo
    from neva_tools.tokenizer.train import train_sentencepiece

    tok = train_sentencepiece(caption_corpus(), export_root / "tok296.model", vocab_size=296)
    hf = build_tiny_llm("llama", export_root / "llm296_hf", sp_model=tok)
    convert_hf_to_nemo(str(hf), export_root / "llm296.nemo")
    nemo = build_neva_nemo(export_root / "llm296.nemo", export_root / "neva296.nemo", hf_clip, template="mistral")
    out = export_hf_llava(nemo, export_root / "hf296")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["image_token_index"] == 296 and cfg["text_config"]["vocab_size"] == 300
    back = state_of(import_hf_llava(out, export_root / "back296.nemo"))
    original = state_of(nemo)
    assert all(torch.equal(original[k], back[k]) for k in original)


def test_bad_inputs(exported: Path, llm_nemo: Path, export_root: Path) -> None:
    with pytest.raises(NevaError, match="already exists; pass --overwrite"):
        import_hf_llava(exported, llm_nemo)
    llm_dir = export_root / "llm_hf"
    with pytest.raises(NevaError, match=r"model_type 'llama' is not 'llava'.*neva convert hf-to-nemo"):
        import_hf_llava(llm_dir, export_root / "x.nemo")
    from safetensors.torch import save_file

    broken = export_root / "hf_broken"
    shutil.copytree(exported, broken)
    state = safetensors_of(exported)
    state["extra.weight"] = torch.zeros(1)
    del state["multi_modal_projector.linear_2.bias"]
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(NevaError, match=r"tensors outside a LLaVA model.*extra.weight"):
        import_hf_llava(broken, export_root / "x.nemo")
    del state["extra.weight"]
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(NevaError, match="projector tensors are"):
        import_hf_llava(broken, export_root / "x.nemo")
    assert not (export_root / "x.nemo").exists()


def test_a_transformers_made_llava_imports_with_its_logits(dist: None, exported: Path, export_root: Path) -> None:
    """A LlavaForConditionalGeneration saved by transformers itself (no neva_export.json, 301-token vocabulary)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    torch.manual_seed(7)
    model = LlavaForConditionalGeneration.from_pretrained(str(exported)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    source = export_root / "hf_made"
    model.save_pretrained(str(source))
    AutoProcessor.from_pretrained(str(exported)).save_pretrained(str(source))
    nemo = import_hf_llava(source, export_root / "hf_made.nemo", vision_dir=export_root / "hf_made_clip")
    with NemoArchive(nemo) as archive:
        assert archive.read_config()["vocab_size"] == 301  # the <image> row is a real row here: kept
    ids = [1, 9, 33, -200, 40, 71, 2]
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(8))
    ours = our_logits(0, 1, str(nemo), str(export_root / "hf_made_clip"), torch.tensor([ids]), pixels)
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor([expand_images(ids, 300, 16)]), pixel_values=pixels).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
