"""Builders of tiny test inputs (no downloads): caption text and random Hugging Face LLMs.

Importable from any test as ``import builders`` (``tests/`` is put on ``sys.path`` by ``conftest.py``).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

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


#: Tiny configs per family: GQA and MHA, tied and untied, rope scaling, Qwen2's QKV biases.
def split_cases() -> list[tuple[Any, tuple[int, ...]]]:
    """One small tensor shape for each TP split kind (a 1-D one where the kind splits biases too), for the
    split/merge and part-tracing tests."""
    from neva_tools.mappings.base import Split

    return [
        (Split.COLUMN, (8, 6)), (Split.COLUMN, (8,)), (Split.QKV, (16, 6)), (Split.ROW, (6, 8)), (Split.ROW, (8,)),
        (Split.GATED_MLP, (16, 6)), (Split.REPLICATED, (6,)), (Split.VOCAB, (10, 6)),
    ]  # fmt: skip


TINY_LLMS = {
    "llama": dict(arch="LlamaForCausalLM", num_key_value_heads=2, tie_word_embeddings=False),
    "llama3": dict(
        arch="LlamaForCausalLM",
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    "mistral": dict(arch="MistralForCausalLM", num_key_value_heads=4, tie_word_embeddings=False, sliding_window=None),
    "qwen2": dict(arch="Qwen2ForCausalLM", num_key_value_heads=2, tie_word_embeddings=True),
}


def build_tiny_llm(
    family: str,
    out: Path,
    *,
    sp_model: Path | None = None,
    shard: str | None = None,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
) -> Path:
    """Save a tiny random HF model of ``family`` (fp32, all weights random incl. norms) into ``out``."""
    import torch
    import transformers

    spec = dict(TINY_LLMS[family])
    arch = spec.pop("arch")
    if kv_heads is not None:
        spec["num_key_value_heads"] = kv_heads
    config_cls = {"LlamaForCausalLM": "LlamaConfig", "MistralForCausalLM": "MistralConfig"}.get(arch, "Qwen2Config")
    config = getattr(transformers, config_cls)(
        vocab_size=300,
        hidden_size=hidden,
        intermediate_size=hidden * 3 // 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        **spec,
    )
    config.architectures = [arch]
    torch.manual_seed(0)
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn_like(param)
            param.copy_(1.0 + 0.1 * noise if "norm" in name else 0.05 * noise)
    model.save_pretrained(str(out), max_shard_size=shard or "50MB")
    if sp_model is not None:
        (out / "tokenizer.model").write_bytes(sp_model.read_bytes())
    return out


def megatron_logits(rank: int, world_size: int, nemo: str, ids: Any) -> Any:
    """For ``run_distributed``: init TP=world_size, load the .nemo, return full-vocabulary logits (padding cut)."""
    import torch

    from neva_tools.model.from_nemo import load_gpt_from_nemo
    from neva_tools.model.parallel import destroy_distributed, init_distributed

    init_distributed(tp=world_size)
    try:
        model, _, arch = load_gpt_from_nemo(nemo)
        position_ids = torch.arange(ids.shape[1]).expand_as(ids)
        with torch.no_grad():
            logits = model.eval()(ids, position_ids, None, runtime_gather_output=True)
        return logits[..., : arch.vocab_size]
    finally:
        destroy_distributed()


def with_chat_tokens(tokenizer: Path, out: Path, tokens: list[str]) -> Path:
    """``tokenizer`` (a sentencepiece model or an HF directory) plus ``tokens`` as user-defined pieces."""
    from neva_tools.tokenizer.add_tokens import add_tokens

    add_tokens(tokenizer, out, tokens, "user_defined")
    return out


def llama_normalized(sp_model: Path, out: Path) -> Path:
    """``sp_model`` with LLaMA's normalizer: identity, whitespace kept (``" a"`` encodes as ``▁ ▁ a``)."""
    from neva_tools.tokenizer import sentencepiece_model as spmodel

    proto = spmodel.load_proto(sp_model)
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.precompiled_charsmap = b""
    out.write_bytes(proto.SerializeToString())
    return out


def byte_level_tokenizer(corpus: list[str], out: Path, tokens: list[str]) -> Path:
    """A Qwen-like byte-level BPE tokenizer (no BOS, EOS ``<|endoftext|>``) plus ``tokens``, in HF directory ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>"], initial_alphabet=alphabet)
    )
    base = out.parent / f"{out.name}_base"
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(str(base))
    return with_chat_tokens(base, out, tokens)


def text_pretrain_assets(root: Path, *, hidden: int = 64, intermediate: int = 96, layers: int = 2) -> dict[str, str]:
    """The smallest text-pretraining job in ``root``: a tokenizer trained on the captions, a tiny LLaMA ``.nemo`` with
    its 320-id vocabulary and the captions as an mmap corpus (``prefix``); ``runs`` is where runs go.

    320 ids need no vocabulary padding at TP 1 or 2 (padded logits take part in the softmax, so TP 1 and TP 2 would
    differ unless the padding does not exist).
    """
    import json

    import torch
    import transformers

    from neva_tools.cli.main import main
    from neva_tools.convert.hf_to_nemo import convert_hf_to_nemo
    from neva_tools.tokenizer.train import train_sentencepiece

    corpus = caption_corpus()
    tok = train_sentencepiece(corpus, root / "tok.model", vocab_size=320)
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=hidden, intermediate_size=intermediate,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128)  # fmt: skip
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(str(root / "hf"))
    (root / "hf" / "tokenizer.model").write_bytes(tok.read_bytes())
    convert_hf_to_nemo(str(root / "hf"), root / "llm.nemo", divisible_by=32)
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": line}) + "\n" for line in corpus))
    status = main(["data", "preprocess", "--no-progress", "--input", str(root / "corpus.jsonl"), "--output-prefix",
                   str(root / "corpus"), "--tokenizer", str(tok), "--append-eod"])  # fmt: skip
    assert status == 0
    return {"root": str(root), "runs": str(root / "runs"), "llm": str(root / "llm.nemo"),
            "prefix": str(root / "corpus_text_document")}  # fmt: skip


def nemo_with_config(source: Path, dest: Path, text: str) -> Path:
    """``source`` (a ``.nemo``) with its ``model_config.yaml`` replaced by ``text`` (surrogates stand for raw bytes)."""
    from neva_tools.checkpoint.nemo_archive import NemoArchive
    from neva_tools.checkpoint.nemo_writer import NemoWriter

    raw = text.encode(errors="surrogateescape")
    with NemoArchive(source) as archive, NemoWriter(dest) as writer:
        for name in archive.names:
            with archive.open(name) as fh:
                writer.add_bytes(name, raw if name == "model_config.yaml" else fh.read())
    return dest
