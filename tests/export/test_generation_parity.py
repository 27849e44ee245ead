"""Greedy generation with our model equals ``transformers``' greedy generation on the exported model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from dist_helpers import in_process_distributed
from neva_models import IMAGE, PATCH, expand_images
from PIL import Image

from neva_tools.data.records import Turn

TOKENS = (IMAGE // PATCH) ** 2
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def dist() -> Iterator[None]:
    with in_process_distributed(tp=1):
        yield


def test_greedy_20_tokens_equal_transformers(dist: None, neva_nemo: Path, hf_clip: Path, exported: Path) -> None:
    from transformers import LlavaForConditionalGeneration

    from neva_tools.inference.generate import generate
    from neva_tools.inference.load import load_neva
    from neva_tools.inference.prompt import generation_prompt

    loaded = load_neva(neva_nemo, vision=hf_clip)
    prompt = generation_prompt([Turn("user", "<image>\nWhat colour is the circle?")], loaded.template,
                               loaded.tokenizer, system="Answer briefly.").input_ids  # fmt: skip
    assert len(prompt) + TOKENS + NEW_TOKENS <= 128  # the tiny LLM's context
    rng = np.random.default_rng(3)
    pixels = loaded.image_processor(Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)))[None]
    with torch.no_grad():
        ours = generate(loaded.model, loaded.tokenizer, prompt, pixels, max_new_tokens=NEW_TOKENS, stop_ids=(),
                        vocab_size=loaded.vocab_size)  # fmt: skip

    hf = LlavaForConditionalGeneration.from_pretrained(str(exported), dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # ours was told not to stop either: compare all 20 tokens
    image_id = json.loads((exported / "config.json").read_text())["image_token_index"]
    ids = torch.tensor([expand_images(prompt, image_id, TOKENS)])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, do_sample=False,
                          max_new_tokens=NEW_TOKENS, pad_token_id=0)  # fmt: skip
    theirs = out[0, ids.shape[1] :].tolist()
    assert len(ours.tokens) == len(theirs) == NEW_TOKENS
    assert ours.tokens == theirs
    assert len(set(theirs)) > 1  # a real continuation, not one repeated token
