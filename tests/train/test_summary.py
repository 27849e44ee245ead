"""What ``neva train`` tells its user: the start and end summaries of a tiny run, the loss history kept across a
resume (``loss.csv`` and ``loss.png`` cover steps 1-4 after max_steps=2 then 4), and "nothing to do" on a re-run of
a finished run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from neva_tools.errors import NevaError
from neva_tools.train.fit import _finished
from neva_tools.train.loss_plot import read_loss, render
from neva_tools.train.summary import RunInfo, count, dataset_counts, end_text, next_commands, part_counts

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "inference"))


def neva_train(assets: dict[str, Any], steps: int) -> tuple[int, str]:
    """``neva train`` of a stage 1 on the tiny assets (24 records, batch 4 × 2 accumulated) in a subprocess."""
    overrides = ["name=s1", f"exp_manager.exp_dir={assets['root'] / 'runs'}",
                 f"model.mm_cfg.llm.from_pretrained={assets['llm']}",
                 f"model.mm_cfg.vision_encoder.from_pretrained={assets['clip']}",
                 f"model.data.image_folder={assets['data']['images']}",
                 f"model.data.data_path={assets['data']['pretrain']}", "model.data.num_workers=0",
                 "model.data.max_seq_length=256", "model.micro_batch_size=4", "model.global_batch_size=8",
                 "model.mm_cfg.llm.model_type=plain", "model.optim.lr=1e-3", "model.optim.sched.min_lr=1e-4",
                 "exp_manager.checkpoint_every_n_steps=0", f"trainer.max_steps={steps}"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, "-m", "neva_tools", "train", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    return done.returncode, done.stdout + done.stderr


def _block(log: str, head: str) -> list[str]:
    """The lines of the multi-line log message that starts with ``head``."""
    lines = log.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(head))
    block = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.startswith("INFO:   "):
            break
        block.append(line.removeprefix("INFO:").strip())
    return block


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same run three times: max_steps=2, then 4 (resumed), then 4 again (finished)."""
    from tiny_neva import build_assets

    assets = build_assets(tmp_path_factory.mktemp("summary"))
    run = assets["root"] / "runs" / "s1"
    records = len(json.loads(assets["data"]["pretrain"].read_text()))
    out: dict[str, Any] = {"assets": assets, "run": run, "records": records}
    for key, steps in (("first", 2), ("resumed", 4)):
        out[key] = neva_train(assets, steps)
        out[f"{key}_csv"] = (run / "logs" / "loss.csv").read_text()
    stamps = lambda: [(run / f).stat().st_mtime_ns for f in ("s1.nemo", "logs/loss.csv", "logs/loss.png")]  # noqa: E731
    before = stamps()
    out["again"] = neva_train(assets, 4)
    out["untouched"] = stamps() == before
    return out


def test_start_summary_of_a_tiny_run(runs: dict[str, Any]) -> None:
    rc, log = runs["first"]
    assert rc == 0, log[-3000:]
    run, records = runs["run"], runs["records"]
    lines = _block(log, "INFO: run s1:")
    assert lines[0] == "INFO: run s1: NeVA stage 1: pretraining (LLM frozen), 2 optimizer steps"
    model = lines[1]
    # the projector (mlp2x_gelu, vision width 32 → LLM width 64): 32×64 + 64 + 64×64 + 64 = 6272 parameters, trained
    assert re.fullmatch(r"model: LLM \S+ \(frozen\), vision tower \S+ \(frozen\), projector 6\.27k \(trains\); "
                        r"6\.27k of \S+ parameters train", model), model  # fmt: skip
    assert "vocabulary: 320 tokens; guessing uniformly gives loss ln(320) = 5.77" in lines
    assert "parallel: TP 1 × PP 1 × DP 1 = 1 process" in lines
    assert "batch: micro 4 × accumulation 2 × DP 1 = global 8 samples per step" in lines
    assert f"data: pretrain.json {records} samples; 2 steps × 8 = 16 samples = {16 / records:.2f} epochs" in lines
    assert any(line.startswith("precision fp32; optimizer fused_adam (lr 0.001,") for line in lines)
    assert f"logs: {run / 'logs'} (loss.csv, loss.png, csv/, tensorboard/)" in lines
    assert f"checkpoints: {run / 'checkpoints'} at the end" in lines and f"final model: {run / 's1.nemo'}" in lines


def test_end_summary_of_a_tiny_run(runs: dict[str, Any]) -> None:
    log = runs["first"][1]
    run = runs["run"]
    rows = [(int(s), float(v)) for s, v, _ in (line.split(",") for line in runs["first_csv"].splitlines()[1:])]
    best = min(rows, key=lambda r: r[1])
    lines = _block(log, "INFO: s1 finished:")
    assert re.fullmatch(r"INFO: s1 finished: 2 steps, 2 in this session \(0:\d\d:\d\d\)", lines[0]), lines[0]
    assert lines[1] == (f"training loss {rows[-1][1]:.4f} at step 2, best {best[1]:.4f} at step {best[0]} "
                        "(uniform guess ln(320) = 5.77)")  # fmt: skip
    nemo = run / "s1.nemo"
    assert f"final model: {nemo}" in lines and nemo.is_file()
    assert f"next: neva export hf-llava --input {nemo} --output s1-hf" in lines
    assert any(line.startswith(f"next: neva eval --model {nemo} --data ") for line in lines)


def test_resume_keeps_the_whole_loss_history(runs: dict[str, Any]) -> None:
    rc, log = runs["resumed"]
    assert rc == 0, log[-3000:]
    first, whole = runs["first_csv"].splitlines(), runs["resumed_csv"].splitlines()
    assert whole[0] == "step,loss,lr" and [int(line.split(",")[0]) for line in whole[1:]] == [1, 2, 3, 4]
    assert whole[:3] == first  # steps 1-2 as the first run wrote them
    assert all(float(line.split(",")[2]) > 0 for line in whole[1:])  # the learning rate of every step
    assert "s1 finished: 4 steps, 2 in this session" in log
    rows = read_loss(runs["run"] / "logs" / "loss.csv")
    best = min(rows, key=lambda r: r.loss)
    assert f"best {best.loss:.4f} at step {best.step}" in log  # over the whole run
    # loss.png is drawn from the whole loss.csv
    again = runs["run"] / "again.png"
    fig = render(runs["run"] / "logs" / "loss.csv", again, title="s1 · NeVA stage 1: pretraining (LLM frozen)",
                 vocab_size=320)  # fmt: skip
    assert list(fig.axes[0].get_lines()[0].get_xdata()) == [1, 2, 3, 4]
    assert again.read_bytes() == (runs["run"] / "logs" / "loss.png").read_bytes()


def test_finished_run_has_nothing_to_do(runs: dict[str, Any]) -> None:
    rc, log = runs["again"]
    nemo = runs["run"] / "s1.nemo"
    assert rc == 0, log[-3000:]
    assert (f"nothing to do: the run already reached max_steps (4); raise trainer.max_steps to continue, or use "
            f"another name=. Final model: {nemo}") in log  # fmt: skip
    assert runs["untouched"] and "INFO: step " not in log  # nothing trained or rewritten


def test_finished_run_without_its_nemo_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(NevaError, match=r"already reached max_steps \(4\) \(its checkpoint ck is at step 5\), but "
                       r"its final model .*missing\.nemo is missing"):  # fmt: skip
        _finished(4, 5, Path("ck"), tmp_path / "missing.nemo", True)
    (tmp_path / "there.nemo").write_bytes(b"x")
    assert _finished(4, 4, Path("ck"), tmp_path / "there.nemo", False) is None  # other ranks return nothing


def test_part_counts_count_tensor_parallel_shards_whole() -> None:
    llm, projector = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
    llm.weight.tensor_model_parallel = True  # a TP=2 shard: 16 of the full 32 weights
    llm.requires_grad_(False)
    model = SimpleNamespace(language_model=llm, vision_model=None, vision_projection=projector)
    assert part_counts(model, tp=2) == [("LLM", 0, 32 + 4), ("projector", 10, 0)]
    assert part_counts(llm, tp=1) == [("LLM", 0, 20)]  # a GPT model: the LLM alone
    assert [count(n) for n in (999, 45_600, 7_240_000, 1.3e9, 0.4)] == ["999", "45.6k", "7.24M", "1.3B", "0.4"]


def tiny_neva_counts(rank: int, world_size: int) -> list[tuple[str, int, int]]:
    from neva_tiny import build

    from neva_tools.model.parallel import init_distributed

    init_distributed(tp=world_size, seed=1234)
    return part_counts(build(world_size, freeze_llm=True, freeze_vision=False), tp=world_size)


def test_part_counts_are_the_same_at_tp1_and_tp2() -> None:
    """A rank holds a shard of each tensor-parallel weight; the summary counts the whole model at any TP."""
    sys.path.insert(0, str(ROOT / "tests" / "model"))
    from dist_helpers import run_distributed

    tp1 = run_distributed(tiny_neva_counts, 1)[0]
    assert run_distributed(tiny_neva_counts, 2) == [tp1, tp1]
    assert [(label, t > 0, f > 0) for label, t, f in tp1] == [
        ("LLM", False, True), ("vision tower", True, False), ("projector", True, False)]  # fmt: skip


def test_dataset_counts_per_annotation_file_and_blend() -> None:
    item = lambda src: SimpleNamespace(record=SimpleNamespace(source=src))  # noqa: E731
    neva = SimpleNamespace(items=[item("/d/a.json"), item("/d/b.jsonl"), item("/d/a.json")])
    assert dataset_counts(neva) == [("a.json", 2), ("b.jsonl", 1)]
    assert dataset_counts(SimpleNamespace(base=neva)) == [("a.json", 2), ("b.jsonl", 1)]  # packed

    class Part(list):
        def __init__(self, path: str, n: int) -> None:
            super().__init__(range(n))
            self.dataset_path = path

    assert dataset_counts(SimpleNamespace(datasets=[Part("/c/web_text_document", 5), Part("/c/code", 3)])) == [
        ("web_text_document", 5), ("code", 3)]  # fmt: skip


def test_text_runs_point_to_the_hf_conversion_and_stopped_runs_to_resuming() -> None:
    text = RunInfo("neo", "text pretraining", "text", 32000, Path("runs/neo/neo.nemo"))
    assert next_commands(text, Path("runs/neo/neo.nemo")) == [
        "neva convert nemo-to-hf --input runs/neo/neo.nemo --output neo-hf"]  # fmt: skip
    rows = [SimpleNamespace(step=s, loss=v) for s, v in ((1, 3.0), (2, 2.0), (3, 2.5))]
    out = end_text(text, step=3, max_steps=10, start_step=0, seconds=75, rows=rows, nemo=None, log_dir=Path("logs"),
                   val=[(2, 2.2), (3, 2.1)])  # fmt: skip
    head = "neo stopped at step 3 of 10 (run it again to resume): 3 steps, 3 in this session (0:01:15)"
    assert out.splitlines()[0] == head
    assert "training loss 2.5000 at step 3, best 2.0000 at step 2" in out
    assert "validation loss 2.1000 at step 3, best 2.1000 at step 3" in out
