"""Shared fixtures: tokenizers trained on generated text (no downloads)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle", "star", "cross", "ring"]
PLACES = ["top left", "top right", "bottom left", "bottom right", "centre"]


def caption_corpus() -> list[str]:
    """Deterministic captions and questions about coloured shapes."""
    lines = []
    for colour, shape, place in itertools.product(COLOURS, SHAPES, PLACES):
        lines.append(f"A {colour} {shape} in the {place} of the image.")
        lines.append(f"What colour is the {shape}? The {shape} is {colour}.")
        lines.append(f"Where is the {colour} {shape}? It is in the {place}.")
    return lines


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
