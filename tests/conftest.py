"""Shared fixtures: tokenizers trained on generated text (no downloads)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from builders import TINY_LLMS, build_tiny_llm, caption_corpus


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return caption_corpus()


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory: pytest.TempPathFactory, corpus: list[str]) -> Path:
    """A LLaMA-style sentencepiece BPE model (unk=0, bos=1, eos=2, byte fallback) trained on the corpus."""
    from neva_tools.tokenizer.train import train_sentencepiece

    return train_sentencepiece(corpus, tmp_path_factory.mktemp("sp") / "tokenizer.model", vocab_size=400)


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, corpus: list[str]) -> Path:
    """A Hugging Face fast tokenizer directory (BPE trained with ``tokenizers``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    out = tmp_path_factory.mktemp("hf") / "tokenizer"
    fast.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session", params=sorted(TINY_LLMS))
def tiny_llm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, sp_model: Path) -> Path:
    """A tiny HF model directory for each family (sharded safetensors for llama)."""
    family = request.param
    shard = "60KB" if family == "llama" else None
    return build_tiny_llm(family, tmp_path_factory.mktemp(family) / "hf", sp_model=sp_model, shard=shard)


@pytest.fixture(scope="session")
def llama_hf(tmp_path_factory: pytest.TempPathFactory, sp_model: Path) -> Path:
    """One tiny LLaMA (GQA, untied) for tests that need a single model."""
    return build_tiny_llm("llama", tmp_path_factory.mktemp("llama_single") / "hf", sp_model=sp_model)


@pytest.fixture(scope="session")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The synthetic shapes dataset (8 training images, 2 held out) and a tokenizer trained on its text."""
    from neva_tools.data import synthetic
    from neva_tools.tokenizer.train import train_sentencepiece

    root = tmp_path_factory.mktemp("shapes")
    paths = synthetic.make_dataset(root, train=8, heldout=2)
    paths["tokenizer"] = train_sentencepiece(synthetic.corpus(), root / "tok.model", vocab_size=320)
    return paths
