"""NeMo's ``CosineAnnealing`` learning-rate schedule (warmup, cosine decay, hold at ``min_lr``).

For step ``s`` (0-based) with ``W = warmup_steps``, ``C = constant_steps`` and ``D = max_steps - W - C``:
warmup ``lr = max_lr * (s + 1) / (W + 1)`` for ``s < W``; then cosine from ``max_lr`` to ``min_lr`` over
``D`` steps; then ``min_lr`` (the last ``C`` steps and beyond). This is NeMo's
``WarmupHoldPolicy``/``CosineAnnealing`` arithmetic, so NeMo configs give the same curve.
"""

from __future__ import annotations

import math

import torch

from neva_tools.errors import NevaError


def cosine_annealing_lr(step: int, *, max_lr: float, min_lr: float, max_steps: int, warmup_steps: int = 0,
                        constant_steps: int = 0) -> float:  # fmt: skip
    """The learning rate at ``step`` (see the module docstring)."""
    if warmup_steps and step < warmup_steps:
        return max_lr * (step + 1) / (warmup_steps + 1)
    decay_steps = max_steps - warmup_steps - constant_steps
    progress = step - warmup_steps
    if decay_steps <= 0 or progress >= decay_steps:
        return min_lr
    return (max_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress / decay_steps)) + min_lr


def check_schedule(max_steps: int, warmup_steps: int, constant_steps: int, max_lr: float, min_lr: float) -> None:
    """Refuse schedules that cannot be what the user meant, naming the values."""
    if max_steps < 1:
        raise NevaError(f"trainer.max_steps ({max_steps}) must be positive")
    if warmup_steps < 0 or constant_steps < 0:
        raise NevaError(f"optim.sched warmup_steps ({warmup_steps}) and constant_steps ({constant_steps}) must be >= 0")
    if warmup_steps + constant_steps > max_steps:
        raise NevaError(f"optim.sched warmup_steps ({warmup_steps}) + constant_steps ({constant_steps}) exceed "
                        f"trainer.max_steps ({max_steps})")  # fmt: skip
    if min_lr > max_lr:
        raise NevaError(f"optim.sched.min_lr ({min_lr}) is larger than optim.lr ({max_lr})")


def cosine_annealing(optimizer: torch.optim.Optimizer, *, max_steps: int, min_lr: float, warmup_steps: int = 0,
                     constant_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:  # fmt: skip
    """A per-step scheduler applying the curve to every param group, each from its own ``lr``.

    ``min_lr`` is scaled per group by ``group_lr / base_lr`` (the first group's lr), so a projector
    trained at 10× the LLM's rate also ends at 10× ``min_lr``.
    """
    base = optimizer.param_groups[0]["lr"]
    check_schedule(max_steps, warmup_steps, constant_steps, base, min_lr)

    def factor(step: int) -> float:
        return cosine_annealing_lr(step, max_lr=1.0, min_lr=min_lr / base, max_steps=max_steps,
                                   warmup_steps=warmup_steps, constant_steps=constant_steps)  # fmt: skip

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
