"""Progress of a training run, on global rank 0: a bar on a terminal, plain log lines anywhere else.

On a terminal (stderr is a TTY and progress is on: ``trainer.enable_progress_bar``, not ``--no-progress`` or
``NEVA_NO_PROGRESS``) a bar counts optimizer steps with the loss, tokens/s, samples/s, elapsed time and ETA.
Otherwise (output in a log file: nohup, SLURM; or the bar turned off) a ``logging`` line with the same fields after
the first step, every ``log_every_n_steps`` steps, at the last step, and at least every ``every_s`` seconds::

    step 12/60 | loss 5.4120 | lr 0.001 | 1.23k tok/s | 8 samples/s | elapsed 0:00:10 | ETA 0:00:40

The loss is what :class:`~neva_tools.train.fit.LossCurve` reads from the device every ``log_every_n_steps`` steps (a
line between two of its reads makes it read then, at most once per ``every_s``). Tokens and samples are counted from
the shape of each batch's ``input_ids`` on rank 0 (no device sync) times the data-parallel size: tokens are input
tokens (an image counts as one), samples are rows (a packed row holds several records).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

import pytorch_lightning as pl

from neva_tools.train.summary import count, duration
from neva_tools.utils.progress_log import is_terminal

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def lines_above(bar: Any) -> Iterator[None]:
    """Log lines printed above ``bar``: tqdm's redirection of the root logger's console handler, keeping that
    handler's level and filters (the logging policy's)."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    root = logging.getLogger()
    before = list(root.handlers)
    with logging_redirect_tqdm(tqdm_class=type(bar)):
        console = next((h for h in before if h not in root.handlers), None)
        for handler in root.handlers:
            if handler not in before and console is not None:
                handler.setLevel(console.level)
                for rule in console.filters:
                    handler.addFilter(rule)
        yield


class TrainProgress(pl.Callback):
    """The progress display of the module docstring; ``curve`` is the run's ``LossCurve`` (placed before this
    callback, so that its reads come first), ``dp`` the data-parallel size, ``bar`` whether a bar may be shown."""

    def __init__(self, curve: Any, *, dp: int = 1, bar: bool = True, every_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, stream: TextIO | None = None) -> None:  # fmt: skip
        self.curve, self.dp, self.bar_wanted, self.every_s = curve, max(1, dp), bar, every_s
        self.clock, self.stream = clock, stream
        self.bar: Any = None
        self._exit = contextlib.ExitStack()
        self._active = False
        self._tokens = self._samples = 0  # since the last shown values
        self._step_before = 0
        self._started = self._last_time = 0.0
        self._first: tuple[int, float] | None = None  # (step, time) when this session's first step ended
        self._shown = -1  # the step of the last shown values

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._active = trainer.is_global_zero
        if not self._active:
            return
        self._started = self._last_time = self.clock()
        self._shown = trainer.global_step
        stream = self.stream if self.stream is not None else sys.stderr
        if self.bar_wanted and is_terminal(stream):
            from neva_tools.utils.log import progress

            bar = progress(total=trainer.max_steps, initial=trainer.global_step, desc="train", unit="step",
                           file=stream, bar_format="{desc} {n_fmt}/{total_fmt} steps |{bar}| "
                           "{elapsed}<{remaining}{postfix}")  # fmt: skip
            if bar.disable:
                bar.close()
            else:
                self.bar = bar
                self._exit.enter_context(lines_above(bar))

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:  # fmt: skip
        self._step_before = trainer.global_step
        ids = batch.get("input_ids") if self._active and isinstance(batch, dict) else None
        if ids is not None:  # the shape only: no device sync
            self._tokens += ids.numel()
            self._samples += ids.shape[0] if ids.dim() else 1

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        step = trainer.global_step
        if not self._active or step == self._step_before:  # not the end of an optimizer step
            return
        now = self.clock()
        if self._first is None:
            self._first = (step, now)
        boundary = step % max(1, trainer.log_every_n_steps) == 0 or step >= trainer.max_steps
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if boundary:
                self.bar.set_postfix_str(self.fields(trainer, now, eta=False), refresh=True)
        elif boundary or step == self._first[0] or now - self._last_time >= self.every_s:
            logger.info("%s", self.fields(trainer, now))

    def fields(self, trainer: Any, now: float, *, eta: bool = True) -> str:
        """The shown values at optimizer step ``trainer.global_step`` (rates since the last shown values)."""
        step = trainer.global_step
        self.curve.read(step)  # a no-op when the curve read this step already
        rows = self.curve.rows
        window = max(now - self._last_time, 1e-9)
        parts = [f"step {step}/{trainer.max_steps}"]
        if rows:
            row = rows[-1]
            parts.append(f"loss {row.loss:.4f}" + (f" (step {row.step})" if row.step != step else ""))
            if row.lr is not None:
                parts.append(f"lr {row.lr:.3g}")
        parts.append(f"{count(self._tokens * self.dp / window)} tok/s")
        parts.append(f"{count(self._samples * self.dp / window)} samples/s")
        if eta:
            parts.append(f"elapsed {duration(now - self._started)}")
            first_step, first_time = self._first or (step, now)
            if step > first_step:  # time per step after the first (which includes start-up work)
                per_step = (now - first_time) / (step - first_step)
                parts.append(f"ETA {duration(per_step * max(trainer.max_steps - step, 0))}")
            else:
                parts.append("ETA -")
        self._tokens = self._samples = 0
        self._last_time, self._shown = now, step
        return (" | " if eta else ", ").join(parts if eta else parts[1:])

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if not self._active:
            return
        if self.bar is None and self._shown != trainer.global_step:  # stopped between two lines
            logger.info("%s", self.fields(trainer, self.clock()))
        self.close()

    def on_exception(self, trainer: pl.Trainer, module: pl.LightningModule, exception: BaseException) -> None:
        self.close()

    def close(self) -> None:
        """Remove the bar (and give the log lines back their handlers)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self._exit.close()
