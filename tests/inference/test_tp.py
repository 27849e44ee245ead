"""Tensor parallelism: two gloo processes (TP=2) generate and evaluate exactly as one process (TP=1)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from dist_helpers import in_process_distributed, run_distributed

from neva_tools.demo import CANDIDATES

QUESTION = "What shape is in the image? Answer with one word."


def _answers(nemo: str, image: str, data: str, images: str) -> dict[str, Any]:
    """Greedy and sampled 20-token generations and the eval report, at the running TP."""
    from neva_tools.data.records import Turn
    from neva_tools.inference.answer import answer
    from neva_tools.inference.evaluate import EvalSettings, evaluate
    from neva_tools.inference.generate import Sampling, generate
    from neva_tools.inference.load import load_images, load_neva
    from neva_tools.inference.prompt import generation_prompt, user_message

    loaded = load_neva(nemo)
    ids = generation_prompt([Turn("user", user_message(QUESTION, 1))], loaded.template, loaded.tokenizer).input_ids
    pixels = load_images([image], loaded.image_processor)
    greedy = generate(loaded.model, loaded.tokenizer, ids, pixels, max_new_tokens=20, stop_ids=()).tokens
    sampled = generate(loaded.model, loaded.tokenizer, ids, pixels, max_new_tokens=20, stop_ids=(),
                       sampling=Sampling(temperature=1.2, top_p=0.9, seed=5)).tokens  # fmt: skip
    report, rows = evaluate(loaded, data, images, EvalSettings(candidates=CANDIDATES, max_new_tokens=8))
    return {"greedy": greedy, "sampled": sampled, "answer": answer(loaded, QUESTION, [image]).text,
            "report": report, "rows": rows}  # fmt: skip


def tp2_job(rank: int, world_size: int, args: list[str], cli: list[str]) -> dict[str, Any]:
    """At TP=2: the API results, then ``neva eval --tp 2`` (which sets up and tears down its own groups)."""
    from neva_tools.cli.main import main
    from neva_tools.model.parallel import init_distributed

    init_distributed(tp=world_size)
    out = _answers(*args)
    out["cli"] = main(cli)
    return out


def test_tp2_equals_tp1(neva_run: dict[str, Any], tmp_path: Path) -> None:
    data = neva_run["data"]
    subset = tmp_path / "subset.json"  # one image, its three questions
    subset.write_text(json.dumps(json.loads(data["heldout"].read_text())[3:6]))
    args = [str(neva_run["nemo"]), str(data["images"] / "00025.png"), str(subset), str(data["images"])]
    candidates = tmp_path / "candidates.json"
    candidates.write_text(json.dumps(CANDIDATES))
    report = tmp_path / "tp2.json"
    cli = ["eval", "--model", args[0], "--data", args[2], "--image-folder", args[3], "--tp", "2", "--output",
           str(report), "--candidates", str(candidates), "--metrics", "choice", "--no-progress"]  # fmt: skip
    tp2 = run_distributed(tp2_job, 2, args, cli, timeout=300)
    with in_process_distributed():
        tp1 = _answers(*args)
    for rank in tp2:
        assert rank["greedy"] == tp1["greedy"] and len(tp1["greedy"]) == 20
        assert rank["sampled"] == tp1["sampled"] and rank["answer"] == tp1["answer"]
        for mine, ref in zip(rank["rows"], tp1["rows"], strict=True):
            assert mine["nll"] == pytest.approx(ref["nll"], rel=1e-5)
            assert {k: v for k, v in mine.items() if k != "nll"} == {k: v for k, v in ref.items() if k != "nll"}
        assert rank["cli"] == 0
        assert rank["report"]["choice"] == tp1["report"]["choice"]
        assert rank["report"]["generation"] == tp1["report"]["generation"]
        assert rank["report"]["loss"]["tokens"] == tp1["report"]["loss"]["tokens"]
        assert rank["report"]["loss"]["value"] == pytest.approx(tp1["report"]["loss"]["value"], rel=1e-5)
    assert json.loads(report.read_text())["choice"] == tp1["report"]["choice"]
