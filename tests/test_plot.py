"""loss.png: matplotlib's own objects say what a reader of the picture will see."""

from __future__ import annotations

import json
import math

import matplotlib.image
from PIL import Image

from apr_cli.distill.plot import LossHistory, loss_figure, write_loss_plot
from apr_cli.distill.rundir import RunDirectory


def history(**changes) -> LossHistory:
    steps = list(range(1, 41))
    fields = {
        "steps": steps,
        "loss": [6.0 - 0.1 * s for s in steps],  # 5.9 .. 2.0: inside one decade
        "ce": [5.5 - 0.1 * s for s in steps],
        "kd": [0.5 + 0.01 * s for s in steps],
        "title": "run-x: loss per step",
    }
    return LossHistory(**{**fields, **changes})


def legend_labels(fig) -> list[str]:
    return [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_axes_are_labelled_and_titled():
    ax = loss_figure(history()).axes[0]
    assert ax.get_xlabel() == "optimizer step"
    assert "loss" in ax.get_ylabel() and "log" in ax.get_ylabel()
    assert ax.get_title() == "run-x: loss per step"
    assert ax.get_yscale() == "log"


def test_kd_and_ce_are_drawn_with_the_total_only_when_there_is_a_teacher():
    assert legend_labels(loss_figure(history())) == ["total (optimized)", "KD", "CE on labels"]
    assert legend_labels(loss_figure(history(kd=None))) == ["total (optimized)"]


def test_ticks_between_two_and_six_are_plain_numbers_inside_the_range():
    fig = loss_figure(history(kd=None, ce=[]))
    fig.canvas.draw()
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    labels = [
        (t.get_loc(), t.label1.get_text())
        for t in ax.yaxis.get_major_ticks()
        if lo <= t.get_loc() <= hi
    ]
    assert [text for _, text in labels] == ["2", "3", "5"]


def test_many_decades_fall_back_to_decade_ticks():
    losses = [10.0 * 0.5**s for s in range(30)]  # 10 .. ~2e-8
    fig = loss_figure(history(steps=list(range(1, 31)), loss=losses, kd=None, ce=[]))
    fig.canvas.draw()
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    texts = [t.label1.get_text() for t in ax.yaxis.get_major_ticks() if lo <= t.get_loc() <= hi]
    assert 3 <= len(texts) <= 10
    assert all(math.log10(float(t)).is_integer() for t in texts), texts


def test_validation_points_and_resume_marks():
    fig = loss_figure(history(validation=[(10, 4.0), (20, 3.5), (40, 3.0)], resumes=[15, 30]))
    ax = fig.axes[0]
    assert legend_labels(fig)[-2:] == ["validation", "resumed"]
    val = next(line for line in ax.get_lines() if line.get_label() == "validation")
    assert list(val.get_xdata()) == [10, 20, 40] and list(val.get_ydata()) == [4.0, 3.5, 3.0]
    marks = [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert marks == [15, 30]


def test_non_positive_losses_are_gaps_not_errors(tmp_path):
    h = history(loss=[0.0, float("nan"), *[1.0] * 38])
    write_loss_plot(tmp_path / "loss.png", h)
    line = loss_figure(h).axes[0].get_lines()[0]
    assert [str(v) for v in line.get_ydata()[:3]] == ["nan", "nan", "1.0"]


def test_saved_png_carries_the_title_and_a_real_picture(tmp_path):
    path = tmp_path / "loss.png"
    write_loss_plot(path, history())
    assert Image.open(path).text["Title"] == "run-x: loss per step"
    pixels = matplotlib.image.imread(path)  # (H, W, 4) floats
    assert pixels.shape[:2] == (450, 800)
    assert len({tuple(p) for p in pixels.reshape(-1, pixels.shape[2])[::97]}) > 10  # not blank


def test_run_directory_history_reads_metrics_and_resumes(tmp_path):
    run = RunDirectory(tmp_path)
    records = [{"step": s, "loss": 3.0, "kd_loss": 1.0, "ce_loss": 2.0} for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records) + '{"step": 4, "lo'  # torn by a crash
    )
    run.write_manifest({"status": "completed", "resumed": [{"from_step": 2}]})
    h = run.loss_history(with_teacher=True)
    assert (h.steps, h.kd, h.ce, h.resumes) == ([1, 2, 3], [1.0] * 3, [2.0] * 3, [2])
    assert run.loss_history(with_teacher=False).kd is None
