"""How long a run trains: ``trainer.max_steps`` and ``trainer.max_epochs``, and the warmup of ``model.optim.sched``.

* Steps from epochs (LLaVA's ``--num_train_epochs``): ``ceil(max_epochs × samples / global_batch_size)``, where
  samples are the training dataset's items (packed rows with ``model.data.packing``). ``trainer.max_steps: -1``
  takes that count; with both set, the smaller wins; ``max_steps: -1`` without ``max_epochs`` is a config problem.
  Text pretraining counts steps only (its samples come from megatron-core's blended dataset, sized by the steps).
* Warmup: ``sched.warmup_ratio`` (LLaVA's ``--warmup_ratio``) gives ``ceil(ratio × steps)`` warmup steps, Hugging
  Face's rule; it replaces ``sched.warmup_steps`` (setting both is a config problem).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from neva_tools.errors import NevaError

logger = logging.getLogger(__name__)


def max_epochs(cfg: DictConfig) -> float | None:
    """``trainer.max_epochs`` as a number, or None when unset (null or -1: max_steps only)."""
    value = OmegaConf.select(cfg, "trainer.max_epochs", default=None)
    if value is None or float(value) == -1:
        return None
    return float(value)


def warmup_ratio(cfg: DictConfig) -> float | None:
    """``model.optim.sched.warmup_ratio`` as a number, or None when unset."""
    value = OmegaConf.select(cfg, "model.optim.sched.warmup_ratio", default=None)
    return None if value is None else float(value)


def step_problems(cfg: DictConfig) -> list[str]:
    """Config problems of ``trainer.max_steps``/``max_epochs`` and the warmup (no dataset needed)."""
    problems: list[str] = []
    steps, sched = int(cfg.trainer.max_steps), cfg.model.optim.sched
    try:
        epochs = max_epochs(cfg)
        ratio = warmup_ratio(cfg)
    except (TypeError, ValueError) as exc:
        return [f"trainer.max_epochs and model.optim.sched.warmup_ratio must be numbers or null ({exc})"]
    text = bool(OmegaConf.select(cfg, "model.text_pretrain.enabled", default=False))
    if steps < 1 and steps != -1:
        problems.append(f"trainer.max_steps ({steps}) must be a positive number of optimizer steps, or -1 to derive "
                        "it from trainer.max_epochs")  # fmt: skip
    if epochs is not None and epochs <= 0:
        problems.append(f"trainer.max_epochs ({epochs:g}) must be positive (null or -1: trainer.max_steps only)")
    if epochs is not None and text:
        problems.append(f"trainer.max_epochs ({epochs:g}) counts passes over NeVA data; text pretraining "
                        "(model.text_pretrain.enabled) trains trainer.max_steps steps of model.global_batch_size "
                        "samples: set trainer.max_steps=N and trainer.max_epochs=null")  # fmt: skip
    elif steps == -1 and epochs is None:
        problems.append("trainer.max_steps is -1 (derive the steps from the epochs) but trainer.max_epochs is not set: "
                        "set trainer.max_steps=N or trainer.max_epochs=E (LLaVA's --num_train_epochs)")  # fmt: skip
    if ratio is not None:
        if not 0 <= ratio < 1:
            problems.append(f"model.optim.sched.warmup_ratio ({ratio:g}) must be in [0, 1): the fraction of the run's "
                            "steps spent warming up")  # fmt: skip
        if int(sched.warmup_steps) > 0:
            problems.append(f"model.optim.sched.warmup_steps ({sched.warmup_steps}) and warmup_ratio ({ratio:g}) are "
                            "both set: keep one (warmup_steps=0 to use the ratio, or warmup_ratio=null)")  # fmt: skip
    if steps > 0 and epochs is None and not problems:  # the run's length is known now
        warmup = warmup_steps(cfg, steps)
        if warmup + int(sched.constant_steps) > steps:
            problems.append(f"model.optim.sched warmup_steps ({warmup}) + constant_steps ({sched.constant_steps}) "
                            f"exceed trainer.max_steps ({steps})")  # fmt: skip
    return problems


def warmup_steps(cfg: DictConfig, steps: int) -> int:
    """The warmup steps of a run of ``steps`` optimizer steps: ``ceil(warmup_ratio × steps)`` or ``warmup_steps``."""
    ratio = warmup_ratio(cfg)
    if ratio is None:
        return int(cfg.model.optim.sched.warmup_steps)
    return math.ceil(ratio * steps)


def steps_from(max_steps: int, epochs: float | None, samples: int | None, global_batch_size: int) -> int:
    """Optimizer steps of a run (see the module docstring); ``samples`` is needed only with ``epochs``."""
    if epochs is None:
        if max_steps < 1:
            raise NevaError(f"trainer.max_steps is {max_steps} and trainer.max_epochs is not set: set one of them")
        return max_steps
    if samples is None:
        raise NevaError(f"trainer.max_epochs ({epochs:g}) needs the dataset's size; this job does not count samples: "
                        "set trainer.max_steps and trainer.max_epochs=null")  # fmt: skip
    from_epochs = max(1, math.ceil(epochs * samples / global_batch_size))
    return from_epochs if max_steps < 1 else min(max_steps, from_epochs)


@dataclass(frozen=True)
class RunLength:
    """A run's optimizer steps and warmup steps."""

    max_steps: int
    warmup_steps: int


def run_length(cfg: DictConfig, samples: int | None, *, what: str = "samples") -> RunLength:
    """The run's length for a training dataset of ``samples`` items (``what`` names them in the log); logged once
    on global rank 0 when it is derived from the epochs or the warmup ratio."""
    from neva_tools.model.parallel import launch_env

    problems = step_problems(cfg)
    if problems:
        raise NevaError("; ".join(problems))
    steps_cfg, epochs, gbs = int(cfg.trainer.max_steps), max_epochs(cfg), int(cfg.model.global_batch_size)
    steps = steps_from(steps_cfg, epochs, samples, gbs)
    warmup = warmup_steps(cfg, steps)
    constant = int(cfg.model.optim.sched.constant_steps)
    if warmup + constant > steps:
        raise NevaError(f"model.optim.sched warmup ({warmup} steps) + constant_steps ({constant}) exceed the run's "
                        f"{steps} optimizer steps")  # fmt: skip
    if launch_env().rank == 0:
        _log(steps_cfg, epochs, samples, gbs, steps, what)
        if warmup_ratio(cfg) is not None:
            logger.info("model.optim.sched.warmup_ratio %g of %d steps: %d warmup steps", warmup_ratio(cfg), steps,
                        warmup)  # fmt: skip
    return RunLength(steps, warmup)


def _log(steps_cfg: int, epochs: float | None, samples: Any, gbs: int, steps: int, what: str) -> None:
    if epochs is None:
        return
    limit = "" if steps_cfg < 1 else f" (trainer.max_steps {steps_cfg}: the smaller wins)"
    logger.info("trainer.max_epochs %g over %d %s at global batch %d: %d optimizer steps%s", epochs, samples, what,
                gbs, steps, limit)  # fmt: skip
