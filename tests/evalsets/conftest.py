"""Fixtures of the benchmark tests: a tiny untrained NeVA ``.nemo``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from neva_models import build_hf_clip, build_neva_nemo

#: The inference tests' tiny LLaMA (tests/inference/tiny_neva.py): a 512-token context holds the MMBench prompts.
LLM_CONFIG = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)  # fmt: skip


def _tiny_llm(root: Path, say: str | None = None) -> Path:
    """The tiny LLaMA as a ``.nemo``; ``say``: its weights edited so that it always answers that token first."""
    import sentencepiece as spm
    import torch
    import transformers

    from neva_tools.convert.hf_to_nemo import convert_hf_to_nemo
    from neva_tools.data import synthetic
    from neva_tools.tokenizer.train import train_sentencepiece

    tok = train_sentencepiece(synthetic.corpus(), root / "tok.model", vocab_size=320)
    config = transformers.LlamaConfig(**LLM_CONFIG)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    if say is not None:
        _always_say(model, spm.SentencePieceProcessor(model_file=str(tok)).encode(say)[-1])
    model.save_pretrained(str(root / "llm_hf"))
    (root / "llm_hf" / "tokenizer.model").write_bytes(tok.read_bytes())
    convert_hf_to_nemo(str(root / "llm_hf"), root / "llm.nemo")
    return root / "llm.nemo"


def _always_say(model: Any, token: int, dim: int = 0) -> None:
    """Residual channel ``dim`` holds 1 for every text token (no layer writes to it), the final norm keeps only that
    channel and the output layer maps it to ``token``: every greedy step picks ``token``, whatever the prompt."""
    import torch

    with torch.no_grad():
        model.model.embed_tokens.weight[:, dim] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[dim] = 0.0
            layer.mlp.down_proj.weight[dim] = 0.0
        model.model.norm.weight.zero_()[dim] = 1.0
        model.lm_head.weight.zero_()[token, dim] = 1.0


@pytest.fixture(scope="session")
def tiny_neva(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random stage-2 NeVA ``.nemo`` (2-layer LLaMA, vicuna_v1, 28 px CLIP): fast to build, fast to run."""
    root = tmp_path_factory.mktemp("evalsets")
    return build_neva_nemo(_tiny_llm(root), root / "neva.nemo", build_hf_clip(root / "clip"))


@pytest.fixture(scope="session")
def says_a_neva(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny NeVA edited to answer "A" to everything (first token): a known MMBench score."""
    root = tmp_path_factory.mktemp("says_a")
    return build_neva_nemo(_tiny_llm(root, "A"), root / "neva.nemo", build_hf_clip(root / "clip"))
