"""A run's loss curve, ``loss.png``, rendered from its ``loss.csv`` (and ``val_loss.csv`` when there is one).

``loss.csv`` has a row per optimizer step: ``step,loss,lr`` (the mean training loss of the step's micro-batches and
the learning rate it trained with; files written before the ``lr`` column have two columns). ``val_loss.csv``
(text pretraining) has ``step,val_loss``. The figure shows the training loss raw (thin) and smoothed (an exponential
moving average, bold), the validation loss, the learning rate on a second axis, and a dashed line at ln(V), the loss
of guessing uniformly among the V tokens of the vocabulary: a curve that stays on it has not learned yet.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The columns of ``loss.csv``.
LOSS_COLUMNS = ("step", "loss", "lr")


@dataclass(frozen=True)
class LossRow:
    """One optimizer step of ``loss.csv``; ``lr`` is None when the file has no learning rate for it."""

    step: int
    loss: float
    lr: float | None = None

    def csv(self) -> str:
        """The row as a line of ``loss.csv``."""
        return f"{self.step},{self.loss},{'' if self.lr is None else self.lr}\n"


def read_loss(path: str | Path, *, upto: int | None = None) -> list[LossRow]:
    """The rows of a ``loss.csv`` (steps up to ``upto`` when given), in step order; [] when the file is missing."""
    path = Path(path)
    if not path.is_file():
        return []
    rows: dict[int, LossRow] = {}
    with path.open(newline="") as fh:
        for record in csv.DictReader(fh):
            step = int(record["step"])
            if upto is None or step <= upto:
                lr = record.get("lr") or None
                rows[step] = LossRow(step, float(record["loss"]), None if lr is None else float(lr))
    return [rows[s] for s in sorted(rows)]


def read_val_loss(path: str | Path, *, upto: int | None = None) -> list[tuple[int, float]]:
    """(step, validation loss) rows of a ``val_loss.csv`` (steps up to ``upto``); [] when the file is missing."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        rows = [(int(r["step"]), float(r["val_loss"])) for r in csv.DictReader(fh)]
    return [(s, v) for s, v in rows if upto is None or s <= upto]


def smoothing_weight(points: int) -> float:
    """The EMA weight for a curve of ``points`` steps: about a tenth of the run, 0 to 0.98 (a 50-step span)."""
    return min(0.98, max(0.0, 1.0 - 10.0 / max(points, 1)))


def ema(values: Sequence[float], weight: float) -> list[float]:
    """Exponential moving average with TensorBoard's bias correction (the first points are not pulled to 0)."""
    out, acc, norm = [], 0.0, 0.0
    for v in values:
        acc = weight * acc + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(acc / norm if norm else v)
    return out


def uniform_loss(vocab_size: int) -> float:
    """The cross-entropy of guessing uniformly among ``vocab_size`` tokens: ln(vocab_size)."""
    return math.log(vocab_size)


def y_range(losses: Sequence[float], uniform: float | None) -> tuple[float, float]:
    """The loss axis' limits: the losses, at least 15% of the top value high (a flat curve looks flat), and the
    uniform-guess line when it is no further above the curve than the curve's own height."""
    if not losses:
        return (0.0, uniform * 1.1) if uniform else (0.0, 1.0)
    lo, hi = min(losses), max(losses)
    span = max(hi - lo, 0.15 * abs(hi), 1e-3)
    if uniform is not None and uniform <= hi + span:
        hi = max(hi, uniform)
    lo = min(lo, hi - span)
    pad = 0.06 * (hi - lo)
    return lo - pad, hi + pad


def render(loss_csv: str | Path, png: str | Path | None = None, *, title: str = "training loss",
           vocab_size: int | None = None, val_csv: str | Path | None = None) -> Any:  # fmt: skip
    """Draw ``loss_csv`` (see the module docstring); save it to ``png`` when given; return the matplotlib Figure.

    ``val_csv`` defaults to ``val_loss.csv`` beside ``loss_csv`` (drawn when it exists); ``vocab_size`` draws the
    ln(V) reference line.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator, ScalarFormatter

    rows = read_loss(loss_csv)
    val = read_val_loss(Path(val_csv) if val_csv is not None else Path(loss_csv).with_name("val_loss.csv"))
    fig = Figure(figsize=(7.5, 5))
    ax = fig.add_subplot()
    steps, losses = [r.step for r in rows], [r.loss for r in rows]
    if len(rows) >= 10:
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="training loss")
        weight = smoothing_weight(len(rows))
        ax.plot(steps, ema(losses, weight), color="tab:blue", linewidth=2.0,
                label=f"training loss, smoothed (EMA {weight:.2f})")  # fmt: skip
    else:  # too few points to smooth: the raw curve, with markers
        ax.plot(steps, losses, color="tab:blue", marker="o", linewidth=1.5, label="training loss")
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], color="tab:orange", marker="o", markersize=4,
                linewidth=1.5, label="validation loss")  # fmt: skip
    lo, hi = y_range(losses + [v for _, v in val], uniform_loss(vocab_size) if vocab_size else None)
    ax.set_ylim(lo, hi)
    if vocab_size:
        uniform = uniform_loss(vocab_size)
        shown = lo <= uniform <= hi
        label = f"uniform guess: ln({vocab_size}) = {uniform:.2f}" + ("" if shown else " (above the plot)")
        ax.axhline(uniform, color="gray", linestyle="--", linewidth=1.0, label=label)
        if shown:
            ax.annotate(f"uniform guess ln({vocab_size})", (1.0, uniform), xycoords=("axes fraction", "data"),
                        xytext=(-4, 3), textcoords="offset points", ha="right", va="bottom", fontsize=8,
                        color="gray")  # fmt: skip
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    plain = ScalarFormatter(useOffset=False)
    plain.set_scientific(False)
    ax.yaxis.set_major_formatter(plain)
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    lrs = [(r.step, r.lr) for r in rows if r.lr is not None]
    if lrs:
        lr_ax = ax.twinx()
        lr_ax.plot([s for s, _ in lrs], [v for _, v in lrs], color="tab:green", linestyle=":", linewidth=1.5,
                   label="learning rate")  # fmt: skip
        lr_ax.set_ylabel("learning rate", color="tab:green")
        lr_ax.tick_params(axis="y", colors="tab:green")
        lr_ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))
        lr_ax.set_ylim(bottom=0)
        more = lr_ax.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    rows_of_legend = math.ceil(len(handles) / 3)
    if handles:  # below the axes: never over the curves
        fig.legend(handles, labels, loc="lower center", ncol=min(3, len(handles)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.055 * rows_of_legend, 1, 1))
    if png is not None:
        Path(png).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(png, dpi=110)
    return fig
