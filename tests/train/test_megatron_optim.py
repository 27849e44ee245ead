"""megatron-core DDP + optimizers on CPU (gloo): the distributed optimizer equals the plain one at DP=2 and holds half
the state per rank; bf16 weights with fp32 master weights follow fp32 training; fp16 loss scaling; part learning
rates; the errors users can cause."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from dist_helpers import in_process_distributed, run_distributed
from neva_tiny import TINY_GPT

from neva_tools.errors import NevaError
from neva_tools.train.optim import OptimSettings

VOCAB = 256
#: TINY_GPT with a plain GELU MLP; TINY_GPT's own SwiGLU MLP fuses ``linear_fc1`` into its activation at TP 1 unless
#: forward hooks sit on ``linear_fc1`` (``overlap_param_gather`` registers them: see ``neva_tools.model.swiglu``).
GELU_GPT = {**TINY_GPT, "activation": "gelu"}
#: The model configs trained at DP=2 (plain vs distributed optimizer with overlapped grad reduce and param gather).
DP2_MODELS = {"gelu": GELU_GPT, "swiglu": TINY_GPT}


def _gpt_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, 16), generator=g), torch.arange(16).expand(2, 16)


def _train_gpt(cfg: dict[str, Any], precision: str, name: str, steps: int, *, lr: float, data_seed: int,
               overlap: bool = False, **optim: Any) -> dict[str, Any]:  # fmt: skip
    """Build the tiny GPT (seed 1234), wrap it, train ``steps`` steps on one fixed batch; losses, weights, bytes."""
    from neva_tools.model.cpu_compat import model_parallel_seed
    from neva_tools.model.gpt import build_gpt_model
    from neva_tools.train import megatron_optim as mo

    model_parallel_seed(1234)
    model = build_gpt_model(cfg, padded_vocab_size=VOCAB)
    before = {k: v.detach().to(mo.PRECISIONS[precision]).clone() for k, v in model.named_parameters()}
    chunks = mo.wrap_model(model, precision=precision, use_distributed_optimizer=mo.uses_distributed_optimizer(name),
                           overlap_grad_reduce=overlap, overlap_param_gather=overlap,
                           bucket_size=10_000 if overlap else None)  # fmt: skip
    optimizer = mo.build_optimizer(chunks, OptimSettings(lr=lr), name=name, **optim)
    ids, pos = _gpt_batch(data_seed)
    losses, results = [], []
    for _ in range(steps):
        mo.zero_grad(chunks, optimizer)
        loss = chunks[0](ids, pos, None, labels=ids).float().mean()
        mo.scale_loss(optimizer, loss).backward()
        results.append(mo.optimizer_step(chunks, optimizer))
        losses.append(loss.item())
    mo.gather_params(chunks)
    after = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = mo.optimizer_state_bytes(optimizer, chunks)
    return {"losses": losses, "before": before, "after": after, "results": results,
            "bytes": (state.moments, state.main_params), "numel": sum(v.numel() for v in after.values()),
            "loss_scale": float(optimizer.get_loss_scale())}  # fmt: skip


def _dp2_runs(rank: int, world_size: int, steps: int) -> dict[str, dict[str, Any]]:
    """At DP=world_size, for each of ``DP2_MODELS``: the plain and the distributed optimizer, fp32 (``steps`` steps)
    and, for GELU, bf16 (one step). Keys ``{plain,dist}_{precision}[_swiglu]``."""
    from neva_tools.model.parallel import destroy_distributed, init_distributed

    init_distributed(tp=1, seed=1234)
    try:
        runs = {}
        for model, cfg in DP2_MODELS.items():
            suffix = "" if model == "gelu" else f"_{model}"
            for precision, n in (("32", steps), ("bf16", 1)) if model == "gelu" else (("32", steps),):
                runs[f"plain_{precision}{suffix}"] = _train_gpt(cfg, precision, "fused_adam", n, lr=1e-3,
                                                                data_seed=rank)  # fmt: skip
                runs[f"dist_{precision}{suffix}"] = _train_gpt(cfg, precision, "distributed_fused_adam", n, lr=1e-3,
                                                               data_seed=rank, overlap=True)  # fmt: skip
        return runs
    finally:
        destroy_distributed()


@pytest.fixture(scope="module")
def dp2() -> list[dict[str, dict[str, Any]]]:
    return run_distributed(_dp2_runs, 2, 4)


@pytest.fixture(scope="module")
def dist() -> Iterator[None]:
    with in_process_distributed(tp=1):
        yield


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("suffix", ["", "_swiglu"], ids=["gelu", "swiglu"])
def test_distributed_optimizer_equals_plain_optimizer_at_dp2(dp2: list[dict[str, dict[str, Any]]], suffix: str) -> None:
    """Same losses, grad norms and updated fp32 weights (the distributed run also overlaps grad reduce-scatter and
    param all-gather, over several buckets); both ranks end with the same weights. For the SwiGLU MLP too, whose
    fused ``linear_fc1`` path must give way to the module call so the param all-gather's forward pre-hook runs."""
    for runs in dp2:
        plain, sharded = runs[f"plain_32{suffix}"], runs[f"dist_32{suffix}"]
        assert len(plain["losses"]) == 4 and all(r.success for r in plain["results"] + sharded["results"])
        assert max(abs(a - b) for a, b in zip(plain["losses"], sharded["losses"], strict=True)) <= 1e-6
        norms = [(a.grad_norm, b.grad_norm) for a, b in zip(plain["results"], sharded["results"], strict=True)]
        assert all(abs(a - b) <= 1e-6 * a for a, b in norms)
        assert _max_diff(plain["after"], sharded["after"]) <= 1e-6
        assert _max_diff(plain["before"], plain["after"]) > 1e-3  # the weights did move
        assert plain["losses"][-1] < plain["losses"][0]
    assert dp2[0][f"plain_32{suffix}"]["losses"] != dp2[1][f"plain_32{suffix}"]["losses"]  # each rank: its own batch
    assert _max_diff(dp2[0][f"dist_32{suffix}"]["after"], dp2[1][f"dist_32{suffix}"]["after"]) == 0.0


def test_distributed_optimizer_halves_state_per_rank(dp2: list[dict[str, dict[str, Any]]]) -> None:
    """Adam moments (fp32) and, for bf16 weights, fp32 master weights: the plain optimizer holds all of them on every
    rank, the distributed one about half on each of the two ranks (and together exactly the parameters)."""
    numel = dp2[0]["plain_32"]["numel"]
    for precision, main_bytes in (("32", 0), ("bf16", 4 * numel)):
        plain = [runs[f"plain_{precision}"]["bytes"] for runs in dp2]
        sharded = [runs[f"dist_{precision}"]["bytes"] for runs in dp2]
        assert plain[0] == plain[1]
        moments, main = plain[0]
        step_counters = moments - 2 * 4 * numel  # Adam's per-parameter 0-d fp32 step tensors
        assert 0 <= step_counters <= 4 * 64 and main == main_bytes
        assert sum(m for _, m in sharded) == main_bytes
        assert 0 <= sum(m for m, _ in sharded) - 2 * 4 * numel <= 2 * step_counters
        for rank_moments, rank_main in sharded:
            assert abs((rank_moments + rank_main) / (moments + main) - 0.5) < 0.01


def test_bf16_with_fp32_master_weights_follows_fp32(dist: None) -> None:
    """At lr 2e-5 an Adam step (~lr) is below half a bf16 ulp of most weights: pure bf16 AdamW leaves most of them
    unchanged and learns half as fast; with fp32 master weights the bf16 weights move and the loss follows fp32."""
    from neva_tools.model.cpu_compat import model_parallel_seed
    from neva_tools.model.gpt import build_gpt_model

    steps, lr = 20, 2e-5
    fp32 = _train_gpt(TINY_GPT, "32", "fused_adam", steps, lr=lr, data_seed=0)
    bf16 = _train_gpt(TINY_GPT, "bf16", "fused_adam", steps, lr=lr, data_seed=0)
    model_parallel_seed(1234)
    pure = build_gpt_model(TINY_GPT, padded_vocab_size=VOCAB).bfloat16()
    before = {k: v.detach().clone() for k, v in pure.named_parameters()}
    adamw = torch.optim.AdamW(pure.parameters(), lr=lr, weight_decay=0.0)
    ids, pos = _gpt_batch(0)
    pure_losses = []
    for _ in range(steps):
        adamw.zero_grad()
        loss = pure(ids, pos, None, labels=ids).float().mean()
        loss.backward()
        adamw.step()
        pure_losses.append(loss.item())

    def changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
        return sum((a[k] != b[k].to(a[k].dtype)).sum().item() for k in a) / sum(v.numel() for v in a.values())

    assert changed(bf16["before"], bf16["after"]) > 0.8  # measured 0.86
    assert changed(before, dict(pure.named_parameters())) < 0.4  # measured 0.32
    assert all(p.dtype == torch.bfloat16 for p in bf16["after"].values())
    drop = fp32["losses"][0] - fp32["losses"][-1]  # measured 0.105
    assert max(abs(a - b) for a, b in zip(fp32["losses"], bf16["losses"], strict=True)) < 0.01  # measured 0.0052
    assert abs(bf16["losses"][0] - bf16["losses"][-1] - drop) < 0.02 * drop  # measured 1.5e-5
    assert abs(pure_losses[0] - pure_losses[-1] - drop) > 0.3 * drop  # measured: pure bf16 drops 0.051


def test_fp16_dynamic_loss_scaling_skips_overflowing_steps(dist: None) -> None:
    fp32 = _train_gpt(TINY_GPT, "32", "fused_adam", 1, lr=1e-3, data_seed=0)
    fp16 = _train_gpt(TINY_GPT, "fp16", "fused_adam", 8, lr=1e-3, data_seed=0, initial_loss_scale=2.0**24,
                      hysteresis=1)  # fmt: skip
    results = fp16["results"]
    first = next(i for i, r in enumerate(results) if r.success)  # measured: 6 overflowing steps, scale 2**18
    assert 0 < first < len(results) - 1 and all(r.success for r in results[first:])
    assert all(r.grad_norm is None for r in results[:first])
    assert fp16["loss_scale"] == 2.0 ** (24 - first)
    assert len(set(fp16["losses"][: first + 1])) == 1  # skipped steps left the weights alone
    assert abs(results[first].grad_norm - fp32["results"][0].grad_norm) < 1e-3 * fp32["results"][0].grad_norm
    assert fp16["losses"][-1] < fp16["losses"][0]


def test_part_learning_rates_weight_decay_and_frozen_parts(dist: None) -> None:
    """A tiny NeVA (frozen ViT) in bf16: projector and LLM groups at their rates, norms without weight decay, no
    state for the frozen ViT; NeMo's cosine schedule ends each part at its own scaled min_lr."""
    from neva_tiny import batch, build, loss_of

    from neva_tools.model.cpu_compat import model_parallel_seed
    from neva_tools.train import megatron_optim as mo

    model_parallel_seed(1234)
    model = build(1, freeze_llm=False, freeze_vision=True)
    vision_before = {k: v.detach().clone() for k, v in model.vision_model.named_parameters()}
    trainable = sum(p.requires_grad for p in model.parameters())
    chunks = mo.wrap_model(model, precision="bf16")
    settings = OptimSettings(lr=1e-3, weight_decay=0.1, projector_lr=1e-2)
    optimizer = mo.build_optimizer(chunks, settings, name="fused_adam", min_lr=1e-5)
    groups = [g for g in optimizer.param_groups if g["params"]]
    summary = {(g["part"], g["weight_decay"], g["lr"]) for g in groups}
    assert summary == {("projector", 0.1, 1e-2), ("projector", 0.0, 1e-2), ("llm", 0.1, 1e-3), ("llm", 0.0, 1e-3)}
    assert all(g["params"][0].dtype == torch.float32 for g in groups)  # the fp32 master weights are stepped
    assert sum(len(g["params"]) for g in groups) == trainable

    mo.zero_grad(chunks, optimizer)
    mo.scale_loss(optimizer, loss_of(chunks[0], batch())).backward()
    result = mo.optimizer_step(chunks, optimizer)
    assert result.success and result.grad_norm is not None and result.grad_norm > 0
    assert sum(len(inner.state) for inner in mo.torch_optimizers(optimizer)) == trainable
    assert all(torch.equal(v, vision_before[k].bfloat16()) for k, v in model.vision_model.named_parameters())

    schedulers = mo.cosine_annealing(optimizer, max_steps=4, min_lr=1e-5)
    for _ in range(4):
        for scheduler in schedulers:
            scheduler.step()
    final = {g["part"]: g["lr"] for g in groups}
    assert final == pytest.approx({"projector": 1e-4, "llm": 1e-5})


def test_errors_users_can_cause(dist: None) -> None:
    from neva_tools.model.gpt import build_gpt_model
    from neva_tools.train import megatron_optim as mo

    with pytest.raises(
        NevaError, match=re.escape("optim.name is 'adamw'; valid names: fused_adam, distributed_fused_adam")
    ):
        mo.uses_distributed_optimizer("adamw")
    model = build_gpt_model(TINY_GPT, padded_vocab_size=VOCAB)
    with pytest.raises(NevaError, match="valid values: 32, bf16, fp16"):
        mo.wrap_model(model, precision="bf16-mixed")
    with pytest.raises(NevaError, match="overlap_param_gather needs the distributed optimizer"):
        mo.wrap_model(model, overlap_param_gather=True)
    with pytest.raises(NevaError, match="precision is '32' but the model's parameters are bfloat16"):
        mo.wrap_model(build_gpt_model(TINY_GPT, padded_vocab_size=VOCAB).bfloat16())
    chunks = mo.wrap_model(model)
    with pytest.raises(NevaError, match="valid names: fused_adam, distributed_fused_adam"):
        mo.build_optimizer(chunks, OptimSettings(lr=1e-3), name="sgd")
    with pytest.raises(NevaError, match="use_distributed_optimizer=True to wrap_model"):
        mo.build_optimizer(chunks, OptimSettings(lr=1e-3), name="distributed_fused_adam")
