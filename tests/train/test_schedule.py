"""NeMo's CosineAnnealing curve."""

from __future__ import annotations

import math

import pytest
import torch

from neva_tools.errors import NevaError
from neva_tools.train.schedule import cosine_annealing, cosine_annealing_lr


def test_curve_points() -> None:
    kw = dict(max_lr=1e-3, min_lr=1e-5, max_steps=110, warmup_steps=10, constant_steps=20)
    assert cosine_annealing_lr(0, **kw) == pytest.approx(1e-3 / 11)
    assert cosine_annealing_lr(9, **kw) == pytest.approx(1e-3 * 10 / 11)
    assert cosine_annealing_lr(10, **kw) == pytest.approx(1e-3)
    mid = 10 + 40  # half of the 80 decay steps
    assert cosine_annealing_lr(mid, **kw) == pytest.approx((1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi / 2)) + 1e-5)
    assert cosine_annealing_lr(90, **kw) == pytest.approx(1e-5)
    assert cosine_annealing_lr(500, **kw) == pytest.approx(1e-5)


def test_scheduler_scales_min_lr_per_group() -> None:
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 1e-2}])
    sched = cosine_annealing(opt, max_steps=10, min_lr=1e-4, warmup_steps=0)
    for _ in range(10):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-4, 1e-3])


def test_bad_schedules_name_values() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    with pytest.raises(
        NevaError, match=r"warmup_steps \(80\) \+ constant_steps \(30\) exceed trainer.max_steps \(100\)"
    ):
        cosine_annealing(opt, max_steps=100, min_lr=0, warmup_steps=80, constant_steps=30)
    with pytest.raises(NevaError, match=r"min_lr \(0.1\) is larger than optim.lr \(0.001\)"):
        cosine_annealing(opt, max_steps=100, min_lr=0.1)
