"""The NeMo tutorial's flow on the tiny model: ``<extra_id_0..7>`` added to the tokenizer (``neva tokenizer add-tokens
--preset neva``), stage 1 (LLM frozen) then stage 2, both with that tokenizer and ``use_im_start_end``; and a
tokenizer with more added tokens than the padded vocabulary rows."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "inference"))
from dist_helpers import run_distributed
from tiny_neva import build_assets

from neva_tools.checkpoint.nemo_archive import NemoArchive
from neva_tools.checkpoint.nemo_tensors import model_config

EMBEDDING, OUTPUT = "model.embedding.word_embeddings.weight", "model.output_layer.weight"
LLM_VOCAB, EXTRA = 320, [f"<extra_id_{i}>" for i in range(8)]


class _Collect(logging.Handler):
    """Keeps the messages logged at INFO and above."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def train_logged(rank: int, world_size: int, overrides: list[str]) -> tuple[str | None, list[str]]:
    """``neva train`` in this process; (the final ``.nemo`` on rank 0, the messages ``neva_tools.train.run`` logged)."""
    from neva_tools.config.load import load_config
    from neva_tools.train.run import train

    handler, log = _Collect(), logging.getLogger("neva_tools.train.run")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    out = train(load_config(None, overrides))
    return (str(out) if out else None), handler.messages


def inference_checks(rank: int, world_size: int, stage1: str, stage2: str, data: str, images: str) -> dict[str, Any]:
    """Load both NeVA files as ``neva generate``/``eval`` do; the stage-2 loss on ``data`` and a generation prompt."""
    from neva_tools.data.records import Turn
    from neva_tools.inference.evaluate import EvalSettings, evaluate
    from neva_tools.inference.load import load_neva
    from neva_tools.inference.prompt import generation_prompt
    from neva_tools.model.parallel import destroy_distributed, init_distributed

    init_distributed(tp=1)
    try:
        first = load_neva(stage1)
        rows = first.model.language_model.embedding.word_embeddings.weight.detach().clone()
        second = load_neva(stage2)
        report, _ = evaluate(second, data, images, EvalSettings(metrics=("loss",)))
        turns = [Turn("user", "<image>\nWhat colour is the shape? <extra_id_1>")]
        prompt = generation_prompt(turns, second.template, second.tokenizer, im_start_end=second.im_start_end)
        return {"vocab": (first.vocab_size, second.vocab_size), "wrap": (first.im_start_end, second.im_start_end),
                "stage1_rows": rows, "loss": report["loss"]["value"], "prompt": prompt.input_ids}  # fmt: skip
    finally:
        destroy_distributed()


def _overrides(assets: dict[str, Any], name: str, tokenizer: Path, data: Path, template: str) -> list[str]:
    return [f"name={name}", f"exp_manager.exp_dir={assets['root'] / 'runs'}",
            f"model.mm_cfg.llm.from_pretrained={assets['llm']}",
            f"model.mm_cfg.vision_encoder.from_pretrained={assets['clip']}", f"model.tokenizer.model={tokenizer}",
            f"model.data.image_folder={assets['data']['images']}", f"model.data.data_path={data}",
            "model.data.num_workers=0", "model.data.max_seq_length=256", "trainer.enable_progress_bar=false",
            "model.micro_batch_size=4", "model.global_batch_size=4", f"model.mm_cfg.llm.model_type={template}",
            "model.optim.lr=3e-3", "model.optim.sched.min_lr=1e-4"]  # fmt: skip


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The inference tests' tiny assets (320-token LLaMA .nemo, 320-piece tokenizer, CLIP 28 px / 7 px) plus the
    tokenizer with NeMo's 8 tokens and finetuning records that use ``<extra_id_1>``."""
    from neva_tools.tokenizer.add_tokens import add_tokens

    assets = build_assets(tmp_path_factory.mktemp("added_tokens"))
    root = assets["root"]
    assets["neva_tok"] = add_tokens(assets["tokenizer"], root / "tok_neva.model", EXTRA).output
    records = json.loads(Path(assets["data"]["finetune"]).read_text())[:24]
    for r in records[::2]:  # half the records ask and answer with the new token
        r["conversations"][0]["value"] += " <extra_id_1>"
        r["conversations"][1]["value"] = "<extra_id_1> " + r["conversations"][1]["value"]
    assets["extra_data"] = root / "finetune_extra.json"
    assets["extra_data"].write_text(json.dumps(records))
    return assets


def _nemo_rows(nemo: str, name: str, vocab: int = LLM_VOCAB + 8) -> torch.Tensor:
    """A full LLM vocabulary tensor as the exports read it (a stage-1 file: the LLM's rows plus the added ones)."""
    from neva_tools.export.source import NemoSource

    with NemoSource(nemo) as source:
        assert source.arch.vocab_size == vocab
        return source.llm_tensor(name)


@pytest.fixture(scope="module")
def runs(assets: dict[str, Any]) -> dict[str, Any]:
    """Stage 1 (LLM frozen, plain, 2 steps, a checkpoint at step 2) then stage 2 from its projector (LLM trained,
    vicuna_v1 on the ``<extra_id_1>`` records, 3 steps), both with the extended tokenizer and ``use_im_start_end``."""
    stage1 = [*_overrides(assets, "stage1", assets["neva_tok"], assets["data"]["pretrain"], "plain"),
              "model.mm_cfg.use_im_start_end=true", "trainer.max_steps=2",
              "exp_manager.checkpoint_every_n_steps=2"]  # fmt: skip
    out1, notes1 = run_distributed(train_logged, 1, stage1, timeout=600)[0]
    stage2 = [*_overrides(assets, "stage2", assets["neva_tok"], assets["extra_data"], "vicuna_v1"),
              "model.mm_cfg.use_im_start_end=true", f"model.mm_cfg.pretrain_mm_mlp_adapter={out1}",
              "model.mm_cfg.llm.freeze=false", "trainer.max_steps=3",
              "exp_manager.checkpoint_every_n_steps=0"]  # fmt: skip
    out2, notes2 = run_distributed(train_logged, 1, stage2, timeout=600)[0]
    return {"stage1": out1, "notes1": notes1, "stage2": out2, "notes2": notes2,
            "initial": {name: _nemo_rows(out1, name) for name in (EMBEDDING, OUTPUT)}}  # fmt: skip


def test_stage1_keeps_the_added_rows_at_their_initial_values(assets: dict[str, Any], runs: dict[str, Any]) -> None:
    from neva_tools.export.source import CheckpointSource

    notes = runs["notes1"]
    assert any("8 tokens beyond the LLM's 320-token vocabulary (ids 320-327)" in n for n in notes), notes
    assert any("the 8 added tokens' rows stay at their initial values" in n for n in notes), notes
    with NemoArchive(runs["stage1"]) as archive:
        cfg = model_config(archive)
        assert cfg["vocab_size"] == 328 and archive.legacy_ranks() == (1, 1)
    step = assets["root"] / "runs" / "stage1" / "checkpoints" / "step=2"
    with CheckpointSource(step, cfg, runs["stage1"]) as source:  # what the run trained, after 2 steps
        for name, rows in runs["initial"].items():
            stored = source.llm_tensor(name)
            assert stored.shape == (328, 64) and torch.equal(stored, rows), name
            mean = rows[:LLM_VOCAB].double().mean(dim=0).float()
            torch.testing.assert_close(rows[LLM_VOCAB:], mean.expand(8, -1))  # the mean of the LLM's rows


def test_a_record_with_a_new_token_is_tokenized_to_its_id(assets: dict[str, Any]) -> None:
    from neva_tools.data.dataset import NevaDataset
    from neva_tools.data.images import ImageProcessor
    from neva_tools.data.registry import DatasetSpec, DatasetUse

    use = DatasetUse(DatasetSpec("x", assets["extra_data"], assets["data"]["images"], "vicuna_v1"))
    item = NevaDataset([use], assets["neva_tok"], ImageProcessor(image_size=28), image_tokens=16, im_start_end=True)[0]
    ids = item["input_ids"].tolist()
    assert 321 in ids and 321 in item["labels"].tolist()  # in the question and in the supervised answer
    assert ids[ids.index(-200) - 1 : ids.index(-200) + 2] == [324, -200, 325]


def test_stage2_trains_the_added_rows(assets: dict[str, Any], runs: dict[str, Any]) -> None:
    notes = runs["notes2"]
    assert any("8 tokens beyond" in n for n in notes) and not any("stay at their initial" in n for n in notes)
    rows = (assets["root"] / "runs" / "stage2" / "logs" / "loss.csv").read_text().splitlines()[1:]
    losses = [float(r.split(",")[1]) for r in rows]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses), losses
    trained, initial = {name: _nemo_rows(runs["stage2"], name) for name in (EMBEDDING, OUTPUT)}, runs["initial"]
    assert not torch.equal(trained[EMBEDDING][321], initial[EMBEDDING][321])  # <extra_id_1> was in the inputs
    changed = (trained[OUTPUT][LLM_VOCAB:] - initial[OUTPUT][LLM_VOCAB:]).abs().amax(dim=1)
    assert bool((changed > 0).all()), changed  # every added token's output row trained (softmax over them)


def test_generate_and_eval_load_the_added_vocabulary(assets: dict[str, Any], runs: dict[str, Any]) -> None:
    checks = run_distributed(inference_checks, 1, runs["stage1"], runs["stage2"], str(assets["extra_data"]),
                             str(assets["data"]["images"]), timeout=600)[0]  # fmt: skip
    nemo_wrap = ("<extra_id_4>", "<extra_id_5>")  # model.mm_cfg.im_start_end_tokens' default, kept in the .nemo
    assert checks["vocab"] == (328, 328) and checks["wrap"] == (nemo_wrap, nemo_wrap)
    torch.testing.assert_close(checks["stage1_rows"][:328], runs["initial"][EMBEDDING], atol=0, rtol=0)
    assert 0 < checks["loss"] < 20  # records with <extra_id_1>: a finite loss over the 328-token vocabulary
    at = checks["prompt"].index(-200)
    assert checks["prompt"][at - 1 : at + 2] == [324, -200, 325] and checks["prompt"].count(321) == 1


def test_hf_export_has_a_row_for_every_added_token(assets: dict[str, Any], runs: dict[str, Any]) -> None:
    """The stage-1 file (LLM rows from the LLM .nemo plus the mean rows) and the stage-2 file (trained rows)."""
    from safetensors.torch import load_file

    from neva_tools.export.hf_llava import export_hf_llava

    for stage in ("stage1", "stage2"):
        out = export_hf_llava(runs[stage], assets["root"] / f"hf_{stage}")
        config = json.loads((out / "config.json").read_text())
        assert config["text_config"]["vocab_size"] == 329 and config["image_token_index"] == 328  # + <image>
        state: dict[str, torch.Tensor] = {}
        for shard in out.glob("*.safetensors"):
            state.update(load_file(str(shard)))
        embed = state["language_model.model.embed_tokens.weight"]
        assert embed.shape == (329, 64)
        torch.testing.assert_close(embed[:328], _nemo_rows(runs[stage], EMBEDDING))
        assert "<extra_id_4><image><extra_id_5>" in (out / "chat_template.jinja").read_text()


def test_more_added_tokens_than_padded_rows_grow_the_vocabulary(assets: dict[str, Any]) -> None:
    """320 + 70 tokens need 390 rows, more than the 384 of the LLM at TP 1: the layers grow to 512 rows."""
    from neva_tools.tokenizer.add_tokens import add_tokens

    tok = add_tokens(assets["tokenizer"], assets["root"] / "tok_many.model", [f"<extra_id_{i}>" for i in range(70)])
    job = [*_overrides(assets, "grown", tok.output, assets["extra_data"], "vicuna_v1"), "model.mm_cfg.llm.freeze=false",
           "trainer.max_steps=2", "exp_manager.checkpoint_every_n_steps=0"]  # fmt: skip
    out, notes = run_distributed(train_logged, 1, job, timeout=600)[0]
    assert any("70 tokens beyond" in n and "grow by 128 rows to 512" in n for n in notes), notes
    with NemoArchive(out) as archive:
        assert model_config(archive)["vocab_size"] == 390
        shard = archive.load_legacy(0, 0)
    assert shard[EMBEDDING].shape[0] == 512 and shard[OUTPUT].shape[0] == 512
    rows = (assets["root"] / "runs" / "grown" / "logs" / "loss.csv").read_text().splitlines()[1:]
    assert len(rows) == 2 and all(0 < float(r.split(",")[1]) < 20 for r in rows)
    grown = _nemo_rows(out, EMBEDDING, vocab=390)
    assert grown.shape == (390, 64) and not torch.equal(grown[321], grown[389])  # <extra_id_1> trained, 389 not
