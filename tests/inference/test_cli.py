"""``neva generate`` and ``neva eval`` end to end in this process (world size 1), and the demo's evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from dist_helpers import in_process_distributed

from neva_tools.cli.main import main
from neva_tools.inference.answer import answer
from neva_tools.inference.generate import Sampling
from neva_tools.inference.load import load_neva

QUESTION = "Where is the shape? Answer with one word."


def test_generate_prompt_and_batch(neva_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    images = neva_run["data"]["images"]
    model = ["--model", str(neva_run["nemo"]), "--no-progress"]
    assert main(["generate", *model, "--image", str(images / "00025.png"), "--prompt", QUESTION, "--json",
                 "--max-new-tokens", "12"]) == 0  # fmt: skip
    single = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    batch = tmp_path / "prompts.jsonl"
    lines = [{"id": "q1", "prompt": QUESTION, "image": "00025.png"},
             {"prompt": "Compare <image> with <image>.", "images": ["00024.png", "00023.png"],
              "system": ""}]  # fmt: skip
    batch.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "answers.jsonl"
    sample = ["--temperature", "0.9", "--top-p", "0.8", "--seed", "3", "--max-new-tokens", "12"]
    argv = ["generate", *model, "--batch", str(batch), "--output", str(out), "--image-folder", str(images), *sample]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["q1", "line 2"]
    with in_process_distributed():
        loaded = load_neva(neva_run["nemo"])
        expected = answer(loaded, QUESTION, [images / "00025.png"], max_new_tokens=12)
        sampled = [answer(loaded, line["prompt"], [images / p for p in line.get("images", [line.get("image")])],
                          system=line.get("system"), max_new_tokens=12, sampling=Sampling(0.9, 0.8, 3))
                   for line in lines]  # fmt: skip
    assert single == {"answer": expected.text, "stop": expected.stop, "new_tokens": len(expected.tokens)}
    assert [(r["answer"], r["stop"], r["new_tokens"]) for r in rows] == [(s.text, s.stop, len(s.tokens))
                                                                         for s in sampled]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 2 and "already exists; pass --overwrite" in capsys.readouterr().err


def test_generate_user_errors(neva_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model, image = ["--model", str(neva_run["nemo"])], str(neva_run["data"]["images"] / "00024.png")
    bad = tmp_path / "bad.jsonl"
    lines = [{"prompt": "hi"}, {"prompt": "hi", "imgae": "x.png"}, {"prompt": "hi", "image": ["x.png"]}]
    bad.write_text("".join(json.dumps(line) + "\n" for line in lines))
    cases = [
        (["--batch", str(bad), "--output", str(tmp_path / "o.jsonl")], "bad.jsonl:line 2: unknown key(s) imgae"),
        (["--batch", str(bad), "--output", str(tmp_path / "o.jsonl")], "line 3: 'image' must be a path"),
        (["--prompt", "hi", "--tp", "2"], "--tp 2 needs exactly 2 process(es), found 1"),
        (["--prompt", "hi", "--output", "x.jsonl"], "--batch FILE.jsonl and --output ANSWERS.jsonl go together"),
        (["--prompt", "<image> and <image>", "--image", image], "has 2 <image> placeholder(s) but 1 image(s)"),
        (["--prompt", "hi", "--image", "gone.png"], "image(s) not found: gone.png"),
    ]
    for args, message in cases:
        assert main(["generate", *model, *args]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert main(["generate", "--model", str(neva_run["llm"]), "--prompt", "hi"]) == 2
    assert "is not a NeVA .nemo" in capsys.readouterr().err


def test_eval_reproduces_the_demo_evaluation(neva_run: dict[str, Any], tmp_path: Path) -> None:
    """The demo's accuracy (``demo.evaluate``) equals ``neva eval --candidates`` on the same held-out split."""
    from neva_tools.demo import evaluate as demo_evaluate

    data = neva_run["data"]
    demo = demo_evaluate(neva_run["nemo"], neva_run["clip"], data["heldout"], data["images"], "vicuna_v1")
    candidates = data["heldout"].with_name("candidates.json")
    out, preds = tmp_path / "report.json", tmp_path / "preds.jsonl"
    argv = ["eval", "--model", str(neva_run["nemo"]), "--data", str(data["heldout"]), "--image-folder",
            str(data["images"]), "--candidates", str(candidates), "--output", str(out), "--predictions", str(preds),
            "--vision", str(neva_run["clip"]), "--max-new-tokens", "4", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    keys = ("accuracy", "chance", "questions")
    by_kind = {kind: {k: v[k] for k in keys} for kind, v in report["choice"]["by_kind"].items()}
    assert by_kind == demo and set(demo) == {"colour", "shape", "position"}
    assert report["records"] == 6 and report["loss"]["tokens"] > 0 and report["generation"]["questions"] == 6
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 6 and all({"choice", "nll", "generated", "reference"} <= set(r) for r in rows)
