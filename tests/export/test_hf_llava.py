"""``neva export hf-llava``: the exported LlavaForConditionalGeneration computes our logits, from any TP."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from dist_helpers import in_process_distributed
from neva_models import IMAGE, PATCH, build_neva_nemo, expand_images, hf_logits, our_logits, safetensors_of
from PIL import Image

from neva_tools.data.images import ImageProcessor
from neva_tools.data.records import Turn
from neva_tools.data.templates import tokenize_conversation
from neva_tools.export.hf_llava import export_hf_llava
from neva_tools.tokenizer.text import TextTokenizer

TOKENS = (IMAGE // PATCH) ** 2
TURNS = [Turn("system", "Answer briefly."), Turn("user", "<image>\nWhat colour is the circle?"),
         Turn("assistant", "The circle is red.")]  # fmt: skip


@pytest.fixture(scope="module")
def dist() -> Iterator[None]:
    with in_process_distributed(tp=1):
        yield


def _inputs(tokenizer: Path, image_size: tuple[int, int] = (40, 30)) -> tuple[list[int], torch.Tensor]:
    ids = tokenize_conversation(TURNS, "vicuna_v1", TextTokenizer(tokenizer)).input_ids
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (image_size[1], image_size[0], 3), dtype=np.uint8))
    return ids, ImageProcessor(IMAGE, "pad")(image)[None]


def test_logits_equal_ours(dist: None, neva_nemo: Path, hf_clip: Path, exported: Path, tokenizer300: Path) -> None:
    ids, pixels = _inputs(tokenizer300)
    ours = our_logits(0, 1, str(neva_nemo), str(hf_clip), torch.tensor([ids]), pixels)
    cfg = json.loads((exported / "config.json").read_text())
    theirs = hf_logits(exported, torch.tensor([expand_images(ids, cfg["image_token_index"], TOKENS)]), pixels)
    assert ours.shape[1] == theirs.shape[1] == len(ids) - 1 + TOKENS
    assert theirs.shape[2] == 301  # <image> appended after the 300 tokens the LLM knows
    assert (ours - theirs[..., :300]).abs().max().item() <= 1e-4
    # the appended <image> row scores the mean logit, so greedy decoding never picks it
    assert torch.allclose(theirs[..., 300], theirs[..., :300].mean(-1), atol=1e-5)


def test_tp2_export_equals_tp1_export(exported_tp2: Path, exported: Path) -> None:
    a, b = safetensors_of(exported), safetensors_of(exported_tp2)
    assert a.keys() == b.keys() and len(a) > 40
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_logits_from_a_tp2_nemo(dist: None, neva_tp2: Path, hf_clip: Path, tokenizer300: Path,
                                exported_tp2: Path) -> None:  # fmt: skip
    """The export of the TP=2 .nemo against our model loaded from that .nemo (shards merged by our loader).

    Our model at TP=2 equals TP=1 (tests/model/test_neva.py); two gloo processes here would add ~20 s.
    """
    ids, pixels = _inputs(tokenizer300, (24, 36))
    ours = our_logits(0, 1, str(neva_tp2), str(hf_clip), torch.tensor([ids]), pixels)
    theirs = hf_logits(exported_tp2, torch.tensor([expand_images(ids, 300, TOKENS)]), pixels)
    assert (ours - theirs[..., :300]).abs().max().item() <= 1e-4


def test_directory_is_complete_and_self_describing(exported: Path) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model, info = LlavaForConditionalGeneration.from_pretrained(str(exported), output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    cfg = model.config
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy, cfg.image_seq_length) == (-2, "default", 16)
    assert cfg.vision_config.num_hidden_layers == 3 and cfg.vision_config.hidden_act == "quick_gelu"
    processor = AutoProcessor.from_pretrained(str(exported))
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == cfg.image_token_index == 300
    assert (processor.patch_size, processor.num_additional_image_tokens) == (PATCH, 1)
    assert json.loads((exported / "generation_config.json").read_text())["eos_token_id"] == [2]  # vicuna: </s>
    provenance = json.loads((exported / "neva_export.json").read_text())
    assert provenance["template"] == "vicuna_v1" and provenance["appended_image_row"] is True


@pytest.mark.parametrize("size", [(40, 30), (28, 28), (20, 50)])
def test_processor_gives_our_ids_and_pixels(exported: Path, tokenizer300: Path, size: tuple[int, int]) -> None:
    from transformers import AutoProcessor

    ids, pixels = _inputs(tokenizer300, size)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "What colour is the circle?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "The circle is red."}]}]  # fmt: skip
    pil = AutoProcessor.from_pretrained(str(exported), backend="pil")
    out = pil.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    assert out["input_ids"][0].tolist() == expand_images(ids, 300, TOKENS)
    assert torch.equal(out["pixel_values"], pixels)  # PIL backend: bit-identical to our ImageProcessor
    fast = AutoProcessor.from_pretrained(str(exported), backend="torchvision")
    diff = (fast.image_processor(image, return_tensors="pt")["pixel_values"] - pixels).abs().max().item()
    assert diff <= 1 / 255 / min(0.26130258, 0.26862954, 0.27577711) + 1e-6  # at most one grey level (resampling)


def test_open_clip_tower(
    dist: None, llm_nemo: Path, open_clip_dir: Path, export_root: Path, tokenizer300: Path
) -> None:
    """An open_clip vision encoder (exact GELU) is converted to a HF CLIP tower with the same features."""
    nemo = build_neva_nemo(llm_nemo, export_root / "neva_openclip.nemo", open_clip_dir, select_layer=-1)
    out = export_hf_llava(nemo, export_root / "hf_openclip")
    ids, pixels = _inputs(tokenizer300)
    ours = our_logits(0, 1, str(nemo), str(open_clip_dir), torch.tensor([ids]), pixels, select_layer=-1)
    theirs = hf_logits(out, torch.tensor([expand_images(ids, 300, TOKENS)]), pixels)
    assert (ours - theirs[..., :300]).abs().max().item() <= 1e-4
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vision_config"]["hidden_act"] == "gelu" and cfg["vision_feature_layer"] == -1
    assert "vision_tower.vision_model.post_layernorm.weight" in safetensors_of(out)  # open_clip ln_post


def test_stage1_nemo_reads_the_llm_it_was_trained_with(llm_nemo: Path, hf_clip: Path, exported: Path,
                                                        export_root: Path) -> None:  # fmt: skip
    stage1 = build_neva_nemo(llm_nemo, export_root / "stage1.nemo", hf_clip, template="plain", include_llm=False)
    out = export_hf_llava(stage1, export_root / "hf_stage1")  # LLM from mm_cfg.llm.from_pretrained
    again = export_hf_llava(stage1, export_root / "hf_stage1_llm", llm=llm_nemo)  # the same, named explicitly
    a, b, c = safetensors_of(out), safetensors_of(exported), safetensors_of(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    assert "plain" in (out / "chat_template.jinja").read_text()
