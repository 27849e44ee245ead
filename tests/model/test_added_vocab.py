"""Tokens added to the tokenizer beyond the LLM's vocabulary: padded rows (or grown ones) start as the mean rows,
their logits are not masked and train, and the loss is the same at TP 1 and 2."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from neva_tools.model.added_vocab import init_added_rows, mean_row, plan_notes, vocab_plan, with_added_rows
from neva_tools.model.gpt import build_gpt_model
from neva_tools.model.vocab_mask import mask_padded_vocab

sys.path.insert(0, str(Path(__file__).parent))
from dist_helpers import run_distributed
from neva_tiny import TINY_GPT

LLM_VOCAB, TOKENS = 200, 208  # the LLM's vocabulary, the tokenizer's with NeMo's 8 <extra_id_*> tokens


def test_plan_takes_padded_rows_or_grows_by_megatrons_rule() -> None:
    fits = vocab_plan({}, 320, 328, 1)
    assert (fits.vocab, fits.llm_padded, fits.padded, fits.added, fits.grown) == (328, 384, 384, 8, 0)
    grows = vocab_plan({"make_vocab_size_divisible_by": 128}, 320, 390, 1)
    assert (grows.vocab, grows.padded, grows.grown) == (390, 512, 128)
    assert vocab_plan({}, 320, 390, 2).grown == 0  # 128 × TP 2: 512 rows already
    assert vocab_plan({}, 320, 300, 1).vocab == 320 and not plan_notes(vocab_plan({}, 320, 300, 1), llm_frozen=True)


def test_notes_say_where_the_rows_come_from_and_that_frozen_rows_stay() -> None:
    frozen = plan_notes(vocab_plan({}, 320, 328, 1), llm_frozen=True)
    assert len(frozen) == 2 and "8 tokens beyond the LLM's 320-token vocabulary (ids 320-327)" in frozen[0]
    assert "take padded rows of the LLM's 384-row" in frozen[0]
    assert "stay at their initial values" in frozen[1] and "model.mm_cfg.llm.freeze: true" in frozen[1]
    grown = plan_notes(vocab_plan({}, 320, 390, 1), llm_frozen=False)
    assert len(grown) == 1 and "grow by 128 rows to 512" in grown[0]


def _gpt(padded: int) -> Any:
    torch.manual_seed(0)
    model = build_gpt_model(TINY_GPT, padded_vocab_size=padded)
    with torch.no_grad():  # padded rows hold anything (NeMo saves its random init there): overwritten for new tokens
        model.embedding.word_embeddings.weight[LLM_VOCAB:] = torch.randn(padded - LLM_VOCAB, 64)
        model.output_layer.weight[LLM_VOCAB:] = torch.randn(padded - LLM_VOCAB, 64)
    return model


def test_added_rows_start_as_the_mean_rows(dist: None) -> None:
    model = _gpt(256)
    emb, out = model.embedding.word_embeddings.weight, model.output_layer.weight
    before_emb, before_out = emb.detach().clone(), out.detach().clone()
    init_added_rows(model, LLM_VOCAB, TOKENS)
    for weight, before in ((emb, before_emb), (out, before_out)):
        expected = before[:LLM_VOCAB].double().mean(dim=0).float()
        torch.testing.assert_close(weight[LLM_VOCAB:TOKENS].detach(), expected.expand(8, -1))
        assert torch.equal(weight[:LLM_VOCAB], before[:LLM_VOCAB])  # the LLM's rows untouched
        assert torch.equal(weight[TOKENS:], before[TOKENS:])  # padding beyond the tokenizer untouched (masked)
    assert not torch.allclose(before_emb[LLM_VOCAB:TOKENS], emb[LLM_VOCAB:TOKENS])
    assert torch.equal(with_added_rows(before_out, LLM_VOCAB, TOKENS), out[:TOKENS].detach())  # the export's rows
    assert torch.equal(mean_row(before_emb, LLM_VOCAB), emb[LLM_VOCAB].detach())


def test_new_tokens_logits_are_not_masked_and_train(dist: None) -> None:
    model = _gpt(256)
    init_added_rows(model, LLM_VOCAB, TOKENS)
    assert mask_padded_vocab(model.output_layer, TOKENS) is not None
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(LLM_VOCAB, TOKENS, (2, 8), generator=g)  # only added tokens, in and out
    positions = torch.arange(8).expand(2, -1)
    logits = model(tokens, positions, None)
    lowest = torch.finfo(logits.dtype).min
    assert torch.isfinite(logits[..., :TOKENS]).all() and bool((logits[..., LLM_VOCAB:TOKENS] > -1e4).all())
    assert bool((logits[..., TOKENS:] == lowest).all())  # beyond the tokenizer: still masked
    loss = model(tokens, positions, None, labels=tokens.roll(-1, dims=1))
    assert float(loss.mean()) < 20  # a masked target would cost ~3e38
    loss.mean().backward()
    out_grad, emb_grad = model.output_layer.weight.grad, model.embedding.word_embeddings.weight.grad
    assert float(out_grad[LLM_VOCAB:TOKENS].abs().min(dim=1).values.min()) > 0  # every new output row trains
    assert float(out_grad[TOKENS:].abs().max()) == 0.0
    assert all(float(emb_grad[i].abs().max()) > 0 for i in tokens.unique().tolist())  # their input rows too


def _loss_with_added_tokens(rank: int, world_size: int, nemo: str, tokenizer_size: int,
                            tokens: torch.Tensor) -> dict[str, Any]:  # fmt: skip
    """The LLM of ``nemo`` at TP=world_size with the model vocabulary of a ``tokenizer_size`` tokenizer, as
    ``neva train`` sets it up; per-token losses and this rank's embedding rows."""
    from types import SimpleNamespace

    from neva_tools.model import neva_io
    from neva_tools.model.parallel import destroy_distributed, init_distributed

    init_distributed(tp=world_size, seed=1234)
    try:
        cfg, vocab = neva_io.llm_config(nemo)
        plan = vocab_plan(cfg, vocab, tokenizer_size, world_size)
        model = build_gpt_model({**cfg, "tensor_model_parallel_size": world_size, "pipeline_model_parallel_size": 1},
                                padded_vocab_size=plan.padded)  # fmt: skip
        neva_io.load_llm(SimpleNamespace(language_model=model), nemo, world_size, rank, plan.padded)
        init_added_rows(model, vocab, plan.vocab)
        mask_padded_vocab(model.output_layer, plan.vocab)
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        with torch.no_grad():
            loss = model.eval()(tokens, positions, None, labels=tokens.roll(-1, dims=1))
        return {"loss": loss, "rows": model.embedding.word_embeddings.weight.detach().clone(), "plan": plan.padded}
    finally:
        destroy_distributed()


@pytest.fixture(scope="module")
def llm_nemo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaMA ``.nemo`` with a 300-token vocabulary (padded to 384 rows at TP 1, 512 at TP 2)."""
    from builders import build_tiny_llm

    from neva_tools.convert.hf_to_nemo import convert_hf_to_nemo

    root = tmp_path_factory.mktemp("added_vocab")
    convert_hf_to_nemo(str(build_tiny_llm("llama", root / "hf")), root / "llm.nemo")
    return root / "llm.nemo"


@pytest.mark.parametrize(("tokenizer_size", "padded"), [(308, (384, 512)), (400, (512, 512))])
def test_tp2_equals_tp1_with_added_tokens(llm_nemo: Path, tokenizer_size: int, padded: tuple[int, int]) -> None:
    """308 tokens fit the padded rows at both TPs; 400 grow TP 1's 384 rows to 512 (TP 2 has 512 already)."""
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, tokenizer_size, (2, 16), generator=g)
    tokens[:, ::3] = torch.randint(300, tokenizer_size, tokens[:, ::3].shape, generator=g)  # many added tokens
    one = run_distributed(_loss_with_added_tokens, 1, str(llm_nemo), tokenizer_size, tokens, timeout=300)[0]
    two = run_distributed(_loss_with_added_tokens, 2, str(llm_nemo), tokenizer_size, tokens, timeout=300)
    assert (one["plan"], two[0]["plan"]) == padded
    torch.testing.assert_close(two[0]["loss"], one["loss"], atol=1e-5, rtol=1e-5)
    assert float(one["loss"].max()) < 20  # the added tokens are predicted, not masked
    full_two = torch.cat([r["rows"] for r in two])  # vocab-parallel: rank 0 holds the first half of the rows
    torch.testing.assert_close(full_two[:tokenizer_size], one["rows"][:tokenizer_size], atol=0, rtol=0)
    mean = one["rows"][:300].double().mean(dim=0).float()
    torch.testing.assert_close(one["rows"][300:tokenizer_size], mean.expand(tokenizer_size - 300, -1))
