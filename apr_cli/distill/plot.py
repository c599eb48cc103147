"""A run's loss curve (loss.png), drawn with matplotlib's Agg backend: no display needed."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from apr_cli.fsutil import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TITLE = "apr loss curve"


@dataclass
class LossHistory:
    """What loss.png shows; every list is indexed like `steps`."""

    steps: list[int]  # 1-based optimizer steps
    loss: list[float]  # the optimized total
    ce: list[float]  # cross-entropy on the labels
    kd: list[float] | None = None  # the KD term; None for a run without a teacher
    validation: list[tuple[int, float]] = field(default_factory=list)  # (step, val_loss)
    resumes: list[int] = field(default_factory=list)  # steps a run was resumed from
    title: str = TITLE


def positive(values: list[float]) -> list[float]:
    """Values a log axis can show; the others become gaps."""
    return [v if math.isfinite(v) and v > 0 else math.nan for v in values]


def tick_subs(values: list[float]) -> tuple[float, ...]:
    """Ticks per decade: a loss between 1.7 and 6 needs more than the decades to be read."""
    finite = [v for v in values if math.isfinite(v)]
    decades = math.log10(max(finite) / min(finite)) if finite else 0.0
    if decades < 1.5:
        return (1.0, 2.0, 3.0, 5.0)
    return (1.0, 2.0, 5.0) if decades < 3 else (1.0,)


def loss_figure(history: LossHistory) -> Figure:
    """The figure: total, KD and CE per step on a log axis, validation points, resume marks."""
    # Imported here, not with the module: a run that fails before its plot (say as a user
    # whose HOME is not writable, where matplotlib warns) prints its one error line alone.
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.add_subplot()
    curves = [(history.steps, history.loss, "total (optimized)", "-", 1.8)]
    if history.kd is not None:
        curves.append((history.steps, history.kd, "KD", "-", 1.0))
        curves.append((history.steps, history.ce, "CE on labels", "-", 1.0))
    if history.validation:
        val_steps, val_losses = zip(*history.validation)
        curves.append((list(val_steps), list(val_losses), "validation", "o-", 1.0))
    shown: list[float] = []
    for steps, values, label, style, width in curves:
        ys = positive(values)
        ax.plot(steps, ys, style, label=label, linewidth=width, markersize=4)
        shown += ys
    for i, step in enumerate(history.resumes):
        ax.axvline(
            step,
            color="gray",
            linestyle="--",
            linewidth=1,
            label="resumed" if i == 0 else "_nolegend_",
        )
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=tick_subs(shown)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per token, log scale)")
    ax.set_title(history.title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def write_loss_plot(path: Path, history: LossHistory) -> None:
    """Save the loss curve as a PNG, atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buffer = io.BytesIO()
    FigureCanvasAgg(loss_figure(history)).print_png(buffer, metadata={"Title": history.title})
    atomic_write_bytes(path, buffer.getvalue())
