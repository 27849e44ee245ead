"""The demo pipeline at reduced size: every stage runs (two CPU processes at TP=2) and reports accuracy, also as
MMBench (the held-out questions as an MMBench TSV, CircularEval and plain); stage 2's multiple-choice records."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from neva_tools.data import synthetic
from neva_tools.demo import CANDIDATES, run
from neva_tools.demo_mmbench import HINT, MC_SHARE, mc_records
from neva_tools.evalsets import mmbench
from neva_tools.evalsets.mmbench import GROUP


def recount(predictions: Path) -> tuple[int, int]:
    """(correct, questions) counted by hand from a per-question TSV: a question is right when every asked row of it
    (its rotations) has the extracted letter equal to its answer."""
    with open(predictions, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    groups: dict[int, list[bool]] = defaultdict(list)
    for row in rows:
        groups[int(row["index"]) % GROUP].append(row["extracted"] == row["answer"])
    return sum(all(hits) for hits in groups.values()), len(groups)


def check_mc_records(finetune: list[dict[str, Any]], heldout: list[dict[str, Any]], share: float) -> list[str]:
    """The multiple-choice records among ``finetune``: about ``share`` of it, on training images only, each the
    MMBench prompt (hint, the kind's question, ``X. option`` lines, the letter instruction) of a one-word record's
    image and question, answered by that record's answer, one of the options' texts. Returns the right letters."""
    mc = [r for r in finetune if r["id"].startswith("mc-")]
    plain = {(r["image"], r["kind"]): r["conversations"][-1]["value"] for r in finetune if r["id"][:3] != "mc-"}
    assert abs(len(mc) / len(finetune) - share) < 1 / len(plain) and {r["kind"] for r in mc} == set(CANDIDATES)
    assert not {r["image"] for r in mc} & {r["image"] for r in heldout}
    letters = []
    for record in mc:
        prompt, answer = record["conversations"][0]["value"], record["conversations"][1]["value"]
        lines = prompt.removeprefix("<image>\n").split("\n")
        if lines[0] == HINT:
            lines = lines[1:]
        question, *option_lines, ask = lines
        assert question == synthetic.QUESTIONS[record["kind"]] and ask == mmbench.ASK_EN
        options = dict(line.split(". ", 1) for line in option_lines)
        choices = CANDIDATES[record["kind"]]
        assert list(options) == list("ABCD"[: len(options)]) and set(options.values()) <= set(choices)
        assert len(options) == min(4, len(choices)) == len(set(options.values()))
        assert answer == plain[record["image"], record["kind"]] and answer in options.values()
        letters += [letter for letter, text in options.items() if text == answer]
    return letters


def check_mmbench(mmb: dict[str, Any], heldout: int) -> None:
    questions = 3 * heldout  # a colour, a shape and a position question per image
    rows = mmbench.read_tsv(mmb["tsv"])
    assert len(rows) == questions and {q.split for q in rows} == {"dev"}
    assert {q.category for q in rows} == set(CANDIDATES) and any(q.hint for q in rows) and not all(q.hint for q in rows)
    records = json.loads(Path(mmb["tsv"]).with_name("heldout.json").read_text())
    for q, record in zip(rows, records, strict=True):  # four of the kind's candidates (shape has three), one right
        assert q.category == record["kind"] and q.options[q.answer] == record["conversations"][-1]["value"]
        assert set(q.options.values()) <= set(CANDIDATES[q.category])
        assert len(set(q.options.values())) == min(4, len(CANDIDATES[q.category]))
    assert len({q.answer for q in rows}) == 4  # the right option is not always at the same letter
    assert mmb["questions"] == mmb["scored"] == questions
    assert mmb["rows_asked"] == mmb["asked_circular"] == sum(len(q.options) for q in rows)  # every rotation
    assert mmb["asked_plain"] == 0  # the plain run's questions are the circular run's first rotations
    table = mmb["table"]["dev"]
    assert {"Overall", "FP-S", *CANDIDATES} <= set(table) and "Overall" in mmb["printed"]
    assert 0.0 <= mmb["overall_circular"] <= mmb["overall_plain"] <= 1.0
    for name in ("circular", "plain"):
        report = json.loads(Path(mmb["report" if name == "circular" else "report_plain"]).read_text())
        assert report["questions"] == questions and report["circular"] == (name == "circular")
        correct, counted = recount(Path(mmb["predictions" if name == "circular" else "predictions_plain"]))
        assert counted == questions and correct == mmb[f"correct_{name}"]
        assert mmb[f"overall_{name}"] == correct / questions


def test_demo_pipeline_reduced(tmp_path: Path) -> None:
    result = run(tmp_path, train=24, heldout=6, stage1_steps=4, stage2_steps=8)
    assert set(result["eval"]) == {"colour", "shape", "position"}
    assert all(r["questions"] == 6 and 0.0 <= r["accuracy"] <= 1.0 for r in result["eval"].values())
    assert Path(result["final_nemo"]).is_file() and Path(result["loss_png"]).is_file()
    written = json.loads((tmp_path / "eval.json").read_text())
    assert written["final_nemo"] == result["final_nemo"] and written["mmbench"] == result["mmbench"]
    losses = [float(r.split(",")[1]) for r in (Path(result["logs"]) / "loss.csv").read_text().splitlines()[1:]]
    assert len(losses) == 8 and losses[-1] < losses[0]
    check_mmbench(result["mmbench"], heldout=6)
    data = tmp_path / "data"
    check_mc_records(json.loads((data / "finetune.json").read_text()), json.loads((data / "heldout.json").read_text()),
                     MC_SHARE)  # fmt: skip
    import sentencepiece as spm

    tokenizer = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer_neva.model"))
    options = [f"{letter}. {word}" for letter in "ABCD" for kind in CANDIDATES.values() for word in kind]
    texts = [mmbench.ASK_EN, HINT, *options]
    ids = [i for text in texts for i in tokenizer.encode(text)]  # the format's text is in the tokenizer's corpus:
    assert not any(tokenizer.IsByte(i) or tokenizer.IsUnknown(i) for i in ids)  # no byte fallback ("'", "B", "C")


def test_mc_records_share_letters_and_hints(tmp_path: Path) -> None:
    """At another share: the count, the right option spread over A–D, a hint on some records and not all."""
    data = synthetic.make_dataset(tmp_path, train=40, heldout=4, size=16)
    records = json.loads(data["finetune"].read_text())
    mc = mc_records(records, CANDIDATES, share=0.25)
    letters = check_mc_records(records + mc, json.loads(data["heldout"].read_text()), 0.25)
    assert len(mc) == len(letters) == 40 and set(letters) == set("ABCD")
    assert 0 < sum(HINT in r["conversations"][0]["value"] for r in mc) < len(mc)
    assert mc == mc_records(records, CANDIDATES, share=0.25) and not mc_records(records, CANDIDATES, share=0.0)


def test_heldout_split_as_mmbench_tsv(tmp_path: Path) -> None:
    """The TSV reads back as MMBench (image references give the image's PNG); the right letter cycles per kind."""
    from PIL import Image

    from neva_tools.data import synthetic
    from neva_tools.demo_mmbench import mmbench_rows, write_tsv

    data = synthetic.make_dataset(tmp_path, train=0, heldout=8, size=32)
    tsv = write_tsv(tmp_path / "heldout_mmbench.tsv", mmbench_rows(data["heldout"], data["images"], CANDIDATES))
    rows, records = mmbench.read_tsv(tsv), json.loads(data["heldout"].read_text())
    assert [q.index for q in rows] == list(range(24)) and sum(q.hint is not None for q in rows) == 6
    for q, record in zip(rows, records, strict=True):
        with Image.open(data["images"] / record["image"]) as png:
            assert list(mmbench.decode_image(q, tsv).getdata()) == list(png.convert("RGB").getdata())
    for kind, n in (("colour", 4), ("shape", 3), ("position", 4)):
        letters = [q.answer for q in rows if q.category == kind]
        assert letters == ["ABCD"[i % n] for i in range(8)]
