"""``loss.png`` rendered from fixture CSVs: title, raw and smoothed loss, validation loss, the learning-rate axis,
integer step ticks, plain tick labels and the ln(vocabulary) reference line."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from neva_tools.train.loss_plot import LossRow, ema, read_loss, read_val_loss, render, y_range


def _lr(step: int) -> float:
    return 1e-3 * min(1.0, step / 6) * 0.5 * (1 + math.cos(math.pi * max(0, step - 6) / 54))


@pytest.fixture
def run_logs(tmp_path: Path) -> Path:
    """60 steps falling from ln(320) with noise, the LR of a warmup + cosine schedule, validation every 10 steps."""
    rows = [LossRow(s, 5.8 - 2.5 * (1 - math.exp(-s / 15)) + 0.15 * math.sin(7 * s), _lr(s)) for s in range(1, 61)]
    (tmp_path / "loss.csv").write_text("step,loss,lr\n" + "".join(r.csv() for r in rows))
    val = "".join(f"{s},{5.8 - 2.3 * (1 - math.exp(-s / 15))}\n" for s in range(10, 61, 10))
    (tmp_path / "val_loss.csv").write_text("step,val_loss\n" + val)
    return tmp_path


def _line(ax: Any, label: str) -> Any:
    return next(line for line in ax.get_lines() if line.get_label().startswith(label))


def test_curve_has_title_smoothing_validation_lr_axis_and_reference_line(run_logs: Path) -> None:
    fig = render(run_logs / "loss.csv", run_logs / "loss.png", title="stage1 · NeVA stage 1", vocab_size=320)
    loss_ax, lr_ax = fig.axes
    assert loss_ax.get_title() == "stage1 · NeVA stage 1"
    raw, smooth = _line(loss_ax, "training loss"), _line(loss_ax, "training loss, smoothed")
    rows = read_loss(run_logs / "loss.csv")
    assert list(raw.get_xdata()) == list(range(1, 61)) and list(raw.get_ydata()) == [r.loss for r in rows]
    assert smooth.get_ydata()[-1] == pytest.approx(ema([r.loss for r in rows], 0.8333333)[-1])
    assert max(abs(a - b) for a, b in zip(smooth.get_ydata()[1:], smooth.get_ydata()[:-1], strict=True)) < max(
        abs(a - b) for a, b in zip(raw.get_ydata()[1:], raw.get_ydata()[:-1], strict=True)
    )  # smoother than the raw curve
    val = _line(loss_ax, "validation loss")
    assert list(val.get_xdata()) == [10, 20, 30, 40, 50, 60]
    reference = _line(loss_ax, "uniform guess")
    assert list(reference.get_ydata()) == pytest.approx([math.log(320)] * 2) and reference.get_linestyle() == "--"
    assert reference.get_label() == "uniform guess: ln(320) = 5.77"
    assert any(t.get_text() == "uniform guess ln(320)" for t in loss_ax.texts)  # labelled on the plot too
    lo, hi = loss_ax.get_ylim()
    assert lo < min(r.loss for r in rows) and hi > math.log(320)
    assert lr_ax.get_ylabel() == "learning rate"
    assert list(lr_ax.get_lines()[0].get_ydata()) == pytest.approx([_lr(s) for s in range(1, 61)])
    assert lr_ax.yaxis.get_major_formatter()(0.0005, 0) == "0.0005"
    assert (run_logs / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ticks_are_plain_numbers_and_whole_steps(tmp_path: Path) -> None:
    """A 4-step run near ln(V): no log-scale labels like 5.75×10^0, no step 1.5, and a flat curve looks flat."""
    (tmp_path / "loss.csv").write_text("step,loss\n1,5.76\n2,5.75\n3,5.74\n4,5.73\n")
    fig = render(tmp_path / "loss.csv", tmp_path / "loss.png", vocab_size=320)
    ax = fig.axes[0]
    fig.canvas.draw()
    assert ax.get_yscale() == "linear"
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels and all(text.replace(".", "").replace("−", "").isdigit() for text in labels), labels
    assert ax.yaxis.get_offset_text().get_text() == ""
    assert all(float(t).is_integer() for t in ax.get_xticks())
    lo, hi = ax.get_ylim()
    assert hi - lo > 0.15 * 5.77  # a 0.03 drop is not blown up to the full height
    assert len(fig.axes) == 1  # no learning-rate column: no second axis
    assert _line(ax, "training loss").get_marker() == "o"  # too few points to smooth


def test_reference_far_above_the_curve_is_named_not_drawn_into_range(run_logs: Path) -> None:
    """Finetuning at loss 3 with ln(32000) = 10.4: the line would squash the curve; the legend says where it is."""
    fig = render(run_logs / "loss.csv", vocab_size=32000)
    ax = fig.axes[0]
    assert ax.get_ylim()[1] < 7
    assert _line(ax, "uniform guess").get_label() == "uniform guess: ln(32000) = 10.37 (above the plot)"


def test_read_loss_keeps_rows_up_to_a_step_and_reads_two_column_files(tmp_path: Path) -> None:
    path = tmp_path / "loss.csv"
    path.write_text("step,loss\n1,3.0\n2,2.5\n3,2.0\n")
    assert read_loss(path, upto=2) == [LossRow(1, 3.0), LossRow(2, 2.5)]
    path.write_text("step,loss,lr\n2,2.5,0.001\n1,3.0,\n")
    assert read_loss(path) == [LossRow(1, 3.0, None), LossRow(2, 2.5, 0.001)]
    assert read_loss(tmp_path / "missing.csv") == [] and read_val_loss(tmp_path / "missing.csv") == []
    (tmp_path / "val_loss.csv").write_text("step,val_loss\n10,2.0\n20,1.5\n")
    assert read_val_loss(tmp_path / "val_loss.csv", upto=15) == [(10, 2.0)]


def test_ema_is_bias_corrected_and_y_range_has_a_floor() -> None:
    assert ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])  # not pulled toward 0 at the start
    assert ema([0.0, 1.0], 0.5) == pytest.approx([0.0, 2 / 3])
    lo, hi = y_range([1.0, 0.5], None)
    assert lo < 0.5 and 1.0 < hi < 1.2
    assert y_range([3.0, 2.0], 3.8)[1] > 3.8 and y_range([3.0, 2.0], 9.0)[1] < 4.0
