"""LLM continued pretraining on mmap text (recipes/text_pretrain/tiny_cpu.yaml) on CPU: the loss falls, an
interrupted run resumes on the same loss curve, TP=2 follows TP=1, and the final GPT .nemo holds the trained
weights and converts back to Hugging Face."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from builders import text_pretrain_assets
from dist_helpers import run_distributed

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "text_pretrain" / "tiny_cpu.yaml"


class StopAt(pl.Callback):
    """Stops training after ``step`` optimizer steps, as a preempted job would be (checkpoints are kept)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _train(assets: dict[str, str], name: str, extra: list[str] = (), stop_at: int | None = None) -> dict[str, Any]:
    """One ``neva train`` of the tiny text recipe in this process; rank 0's losses, validation losses and .nemo."""
    from neva_tools.config.load import load_config
    from neva_tools.train import fit
    from neva_tools.train.run import train

    overrides = [f"name={name}", f"exp_manager.exp_dir={assets['runs']}",
                 f"model.mm_cfg.llm.from_pretrained={assets['llm']}",
                 f"model.text_pretrain.data_path={assets['prefix']}", *extra]  # fmt: skip
    original = fit.make_trainer
    if stop_at is not None:
        fit.make_trainer = lambda s, d, callbacks=None, **k: original(s, d, [*(callbacks or []), StopAt(stop_at)], **k)
    try:
        out = train(load_config(RECIPE, overrides))
    finally:
        fit.make_trainer = original
    logs = Path(assets["runs"]) / name / "logs"
    read = lambda f: [float(r.split(",")[1]) for r in (logs / f).read_text().splitlines()[1:]] if out else []  # noqa: E731
    return {"nemo": str(out) if out else None, "losses": read("loss.csv"), "val": read("val_loss.csv")}


def tp1_runs(rank: int, world_size: int, assets: dict[str, str]) -> dict[str, Any]:
    """A 40-step run; the same run stopped at step 20 and resumed; then the final .nemo checked against the run."""
    import torch

    from neva_tools.model.from_nemo import load_gpt_from_nemo
    from neva_tools.model.parallel import init_distributed
    from neva_tools.train import checkpoint as ckpt

    full = _train(assets, "full")
    first = _train(assets, "split", stop_at=20)
    second = _train(assets, "split")
    init_distributed(tp=1)
    model, _, _ = load_gpt_from_nemo(full["nemo"])
    trained, _, _ = load_gpt_from_nemo(assets["llm"])  # same architecture, then the run's last dist checkpoint
    ckpt.load(Path(assets["runs"]) / "full" / "checkpoints" / "step=40", trained, None)
    nemo_state, run_state = model.state_dict(), trained.state_dict()
    exact = sorted(k for k in run_state if not k.endswith("_extra_state") and torch.equal(nemo_state[k], run_state[k]))
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model.eval()(ids, torch.arange(12).expand_as(ids), None, runtime_gather_output=True)
    return {"full": full, "first": first, "second": second, "exact": exact,
            "keys": sorted(k for k in run_state if not k.endswith("_extra_state")), "ids": ids,
            "logits": logits[..., :320]}  # fmt: skip


def tp2_run(rank: int, world_size: int, assets: dict[str, str]) -> dict[str, Any]:
    """The same run at TP=2 on two processes, stopped after 8 steps."""
    return _train(assets, "tp2", ["model.tensor_model_parallel_size=2"], stop_at=8)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tokenizer trained on captions, a tiny LLaMA .nemo with its vocabulary, the captions as an mmap corpus."""
    return text_pretrain_assets(tmp_path_factory.mktemp("text_pretrain"))


@pytest.fixture(scope="module")
def tp1(assets: dict[str, str]) -> dict[str, Any]:
    return run_distributed(tp1_runs, 1, assets, timeout=600)[0]


def test_loss_falls_on_the_text_corpus(tp1: dict[str, Any], assets: dict[str, str]) -> None:
    losses, val = tp1["full"]["losses"], tp1["full"]["val"]
    assert len(losses) == 40 and len(val) == 4  # validation every 10 steps
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses
    assert val[-1] < 0.8 * val[0], val
    run = Path(assets["runs"]) / "full"
    assert (run / "logs" / "loss.png").is_file() and (run / "checkpoints" / "step=40" / "metadata.json").is_file()
    assert any((run / "index_cache").glob("*-GPTDataset-train-shuffle_index.npy"))


def test_resume_continues_the_same_loss_curve(tp1: dict[str, Any]) -> None:
    """The resumed run's loss.csv and val_loss.csv hold the whole run: the first 20 steps as written, then the rest."""
    first, second, full = tp1["first"]["losses"], tp1["second"]["losses"], tp1["full"]["losses"]
    assert len(first) == 20 and len(second) == 40 and second[:20] == first
    assert max(abs(a - b) for a, b in zip(second, full, strict=True)) <= 1e-5
    assert len(tp1["first"]["val"]) == 2 and tp1["second"]["val"][:2] == tp1["first"]["val"]
    assert max(abs(a - b) for a, b in zip(tp1["second"]["val"], tp1["full"]["val"], strict=True)) <= 1e-5


def test_tp2_loss_equals_tp1(tp1: dict[str, Any], assets: dict[str, str]) -> None:
    tp2 = run_distributed(tp2_run, 2, assets, timeout=600)[0]
    assert len(tp2["losses"]) == 8
    assert max(abs(a - b) for a, b in zip(tp2["losses"], tp1["full"]["losses"][:8], strict=True)) <= 1e-5
    from neva_tools.checkpoint.nemo_archive import NemoArchive

    with NemoArchive(tp2["nemo"]) as archive:
        assert archive.legacy_ranks() == (2, 1)


def test_final_nemo_holds_the_trained_weights(tp1: dict[str, Any]) -> None:
    assert tp1["exact"] == tp1["keys"] and len(tp1["keys"]) > 10  # bit-exact with the run's last checkpoint


def test_final_nemo_converts_to_hf_with_the_same_logits(tp1: dict[str, Any], tmp_path: Path) -> None:
    import torch
    import transformers

    from neva_tools.convert.nemo_to_hf import convert_nemo_to_hf

    convert_nemo_to_hf(tp1["full"]["nemo"], tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(tp1["ids"]).logits
    assert (tmp_path / "hf" / "tokenizer.model").is_file()
    assert torch.allclose(logits, tp1["logits"], atol=1e-4, rtol=0), (logits - tp1["logits"]).abs().max()


def test_config_problems_stop_the_run_before_it_starts(assets: dict[str, str], tmp_path: Path) -> None:
    from neva_tools.config.load import load_config
    from neva_tools.errors import NevaError
    from neva_tools.train.run import train

    blend = f"model.text_pretrain.data_path=0.5 {assets['prefix']} 0.5 {tmp_path}/code"
    cfg = load_config(RECIPE, [f"model.mm_cfg.llm.from_pretrained={assets['llm']}", f"exp_manager.exp_dir={tmp_path}",
                               blend])  # fmt: skip
    with pytest.raises(NevaError, match=rf"prefix {tmp_path}/code has no {tmp_path}/code\.bin"):
        train(cfg)
    assert not (tmp_path / "tiny_text").exists()
