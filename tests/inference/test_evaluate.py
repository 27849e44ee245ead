"""``neva_tools.inference.evaluate``: loss, multiple choice and short answers against independent computations."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_helpers import in_process_distributed

from neva_tools.data.dataset import collate
from neva_tools.data.records import Turn
from neva_tools.data.templates import IGNORE_INDEX, IMAGE_TOKEN_INDEX, tokenize_conversation
from neva_tools.demo import CANDIDATES
from neva_tools.errors import NevaError
from neva_tools.inference.answer import answer
from neva_tools.inference.evaluate import EvalSettings, evaluate, normalize_answer, short_answer_scores
from neva_tools.inference.load import LoadedNeva, load_neva


@pytest.fixture(scope="module")
def loaded(neva_run: dict[str, Any]) -> Iterator[LoadedNeva]:
    with in_process_distributed():
        yield load_neva(neva_run["nemo"])


@torch.no_grad()
def demo_reference(loaded: LoadedNeva, heldout: Path, images: Path) -> list[tuple[str, torch.Tensor]]:
    """The demo's likelihood scoring written out plainly, one candidate at a time over the true vocabulary:
    (best candidate, NLL of each candidate's answer and end tokens) per record."""
    model, tok, out = loaded.model, loaded.tokenizer, []
    for record in json.loads(heldout.read_text()):
        question = record["conversations"][0]["value"]
        image = loaded.image_processor(images / record["image"])[None]
        nlls = []
        for candidate in CANDIDATES[record["kind"]]:
            t = tokenize_conversation([Turn("user", question), Turn("assistant", candidate)], "vicuna_v1", tok)
            ids = torch.tensor([t.input_ids])
            logits = model(image, ids, torch.arange(ids.shape[1])[None], None, runtime_gather_output=True)[0][0]
            logp = torch.log_softmax(logits[:, : loaded.vocab_size], dim=-1)
            position, nll = -1, 0.0
            for i, token in enumerate(t.input_ids):  # logits at a token's last position predict the next token
                if i and t.labels[i] != IGNORE_INDEX:
                    nll -= float(logp[position, token])
                position += model.img_seq_len if token == IMAGE_TOKEN_INDEX else 1
            nlls.append(nll)
        out.append((CANDIDATES[record["kind"]][min(range(len(nlls)), key=nlls.__getitem__)], torch.tensor(nlls)))
    return out


@pytest.fixture(scope="module")
def reference(loaded: LoadedNeva, neva_run: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    return demo_reference(loaded, neva_run["data"]["heldout"], neva_run["data"]["images"])


def test_choice_equals_demo_scoring(loaded: LoadedNeva, neva_run: dict[str, Any], reference: list[Any]) -> None:
    data = neva_run["data"]
    report, rows = evaluate(loaded, data["heldout"], data["images"],
                            EvalSettings(metrics=("choice",), candidates=CANDIDATES))  # fmt: skip
    assert [r["choice"] for r in rows] == [best for best, _ in reference]
    records = json.loads(data["heldout"].read_text())
    for row, record, (_, want) in zip(rows, records, reference, strict=True):
        assert list(row["nll"]) == CANDIDATES[record["kind"]]
        torch.testing.assert_close(torch.tensor(list(row["nll"].values())), want, rtol=1e-6, atol=1e-4)
    for kind, summary in report["choice"]["by_kind"].items():
        mine = [(best, rec) for (best, _), rec in zip(reference, records, strict=True) if rec["kind"] == kind]
        hits = [best == rec["conversations"][1]["value"] for best, rec in mine]
        assert summary["questions"] == len(mine) == 2
        assert summary["accuracy"] == sum(hits) / len(hits)
        assert summary["chance"] == 1 / len(CANDIDATES[kind])
    assert report["choice"]["questions"] == len(records) and "loss" not in report and "generation" not in report


def test_loss_is_the_token_mean_nll(loaded: LoadedNeva, neva_run: dict[str, Any]) -> None:
    """Batched by 4 (with padding) or all at once, the loss is the token mean of the scored supervised tokens."""
    from neva_tools.data.dataset import NevaDataset
    from neva_tools.data.registry import DatasetSpec, DatasetUse
    from neva_tools.inference.scoring import token_nll

    data = neva_run["data"]
    small, _ = evaluate(loaded, data["heldout"], data["images"], EvalSettings(metrics=("loss",), batch_size=4))
    whole, _ = evaluate(loaded, data["heldout"], data["images"], EvalSettings(metrics=("loss",), batch_size=12))
    spec = DatasetSpec("heldout", data["heldout"], data["images"], "vicuna_v1")
    dataset = NevaDataset([DatasetUse(spec)], loaded.tokenizer.path, loaded.image_processor, image_tokens=16)
    batch = collate([dataset[i] for i in range(len(dataset))], loaded.tokenizer.pad_id)
    tokens = int(batch["loss_mask"].sum())
    mean = float(token_nll(loaded.model, batch, loaded.vocab_size).sum()) / tokens
    assert small["loss"]["tokens"] == whole["loss"]["tokens"] == tokens and small["loss"]["records"] == 6
    assert small["loss"]["value"] == pytest.approx(mean, rel=1e-6) and whole["loss"]["value"] == pytest.approx(mean)


def test_generation_scores_follow_generate(loaded: LoadedNeva, neva_run: dict[str, Any], tmp_path: Path) -> None:
    """References set to the model's own answers (re-cased, punctuated) score 1, others 0, long ones are skipped."""
    data = neva_run["data"]
    records = json.loads(data["heldout"].read_text())[:4]
    for i, record in enumerate(records):
        got = answer(loaded, record["conversations"][0]["value"], [data["images"] / record["image"]],
                     max_new_tokens=16).text  # fmt: skip
        assert got, "the tiny model gave an empty answer; the test needs a non-empty one"
        record["conversations"][1]["value"] = [f"{got.upper()}.", "zebra", f"{got} extra words a b c", got][i]
    path = tmp_path / "short.json"
    path.write_text(json.dumps(records))
    report, rows = evaluate(loaded, path, data["images"], EvalSettings(metrics=("generation",), max_new_tokens=16))
    gen = report["generation"]
    assert gen["questions"] == 3 and gen["exact_match"] == pytest.approx(2 / 3) == gen["contains"]
    assert "generated" not in rows[2] and rows[0]["generated"] == rows[3]["reference"]


def test_short_answer_scores() -> None:
    assert normalize_answer("  The  RED, shape! ") == "the red shape"
    assert short_answer_scores("Red.", "red") == (True, True)
    assert short_answer_scores("It is red and round", "red") == (False, True)
    assert short_answer_scores("reddish", "red") == (False, False)
    assert short_answer_scores("anything", "...") == (False, False)


def test_errors_name_the_record_or_key(loaded: LoadedNeva, neva_run: dict[str, Any], tmp_path: Path) -> None:
    data = neva_run["data"]
    with pytest.raises(NevaError, match=r"heldout.json:index 0 \(id colour-24\): the reference answer .* is not one"):
        evaluate(loaded, data["heldout"], data["images"], EvalSettings(metrics=("choice",), candidates=["x", "y"]))
    extra = {**CANDIDATES, "size": ["big", "small"]}
    with pytest.raises(NevaError, match=r"kind\(s\) size match no record"):
        evaluate(loaded, data["heldout"], data["images"], EvalSettings(metrics=("choice",), candidates=extra))
    partial = {"colour": CANDIDATES["colour"]}
    with pytest.raises(NevaError, match="kind 'shape' has no candidates list"):
        evaluate(loaded, data["heldout"], data["images"], EvalSettings(metrics=("choice",), candidates=partial))
    with pytest.raises(NevaError, match=r"unknown metrics \['bleu'\]"):
        EvalSettings(metrics=("loss", "bleu"))
    own = tmp_path / "own.json"
    own.write_text(json.dumps([{**json.loads(data["heldout"].read_text())[0], "candidates": "red"}]))
    with pytest.raises(NevaError, match="'candidates' must be a non-empty list"):
        evaluate(loaded, own, data["images"], EvalSettings(metrics=("choice",)))
