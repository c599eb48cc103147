"""Metric sinks: TensorBoard and Weights & Biases beside metrics.jsonl, under shared names."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from apr_cli.errors import AprError

if TYPE_CHECKING:  # the run options import this module, and stay free of torch
    from apr_cli.distill.pipeline import StepMetrics

JSONL = "jsonl"  # metrics.jsonl, always written by the run directory
SINKS = (JSONL, "tensorboard", "wandb")
TENSORBOARD_DIR = "tensorboard"
WANDB_PROJECT = "apr"
# The package each sink imports, and the extra that installs it.
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


class MetricSink(Protocol):
    """Somewhere scalars go: `log` them at a step (steps only grow), then `close`."""

    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def parse_report_to(value: str) -> tuple[str, ...]:
    """`tensorboard,wandb` -> the sinks besides metrics.jsonl; unknown names refused."""
    names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    unknown = [n for n in names if n not in SINKS]
    if unknown:
        raise AprError(f"--report-to: unknown sink {unknown[0]!r}; choose from {', '.join(SINKS)}")
    return tuple(n for n in names if n != JSONL)


def check_installed(names: tuple[str, ...]) -> None:
    """Refuse a sink whose package is missing, naming the extra that installs it."""
    for name in names:
        try:
            importlib.import_module(PACKAGES[name])
        except ImportError:
            raise AprError(
                f"--report-to {name}: the {PACKAGES[name]} package is not installed; "
                f"pip install 'apr-cli[{name}]'"
            ) from None


def train_scalars(m: StepMetrics) -> dict[str, float]:
    """A step's metrics under the names every sink uses."""
    return {
        "train/loss": m.loss,
        "train/kd": m.kd_loss,
        "train/ce": m.ce_loss,
        "train/lr": m.lr,
        "train/grad_norm": m.grad_norm,
        "train/tokens_per_s": m.tokens_per_s,
    }


def val_scalars(row: dict[str, Any]) -> dict[str, float]:
    """An eval row (see validation.Validator.run) under the names every sink uses."""
    names = {"val_loss": "val/loss", "kl_to_teacher": "val/kl_to_teacher"}
    names["top1_agreement"] = "val/top1_agreement"
    return {name: row[key] for key, name in names.items() if key in row}


class TensorBoardSink:
    """Event files under RUN/tensorboard; a resumed run purges the steps it will redo."""

    def __init__(self, run_dir: Path, resumed_at: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard drops events at or after it from the earlier files, so steps
        # logged after the checkpoint by a killed run do not appear twice.
        purge = None if resumed_at is None else resumed_at + 1
        self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR), purge_step=purge)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, global_step=step)
        # Handed to the OS each step: a killed run otherwise loses what the writer still held
        # (up to 120 s of events), steps before its checkpoint that a resume does not redo.
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A W&B run (WANDB_MODE=offline records it under RUN/wandb without an account)."""

    def __init__(self, run_dir: Path, config: dict[str, Any], run_id: str):
        import wandb

        # One W&B run per run directory: a resume continues it under the same id.
        try:
            self.run = wandb.init(
                project=WANDB_PROJECT,
                dir=str(run_dir),
                id=run_id,
                name=run_dir.name,
                config=config,
                resume="allow",
            )
        except Exception as e:  # no login, no network: W&B's own reasons, on one line
            wandb.teardown()  # its process-wide settings must not outlive this failed start
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise AprError(
                f"--report-to wandb: {reason} (WANDB_MODE=offline needs no account)"
            ) from None

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        import wandb

        self.run.finish()
        # finish() can return before W&B's service has written the last records; stopping the
        # service waits for them.
        wandb.teardown()


def open_sinks(
    names: tuple[str, ...],
    run_dir: Path,
    config: dict[str, Any],
    run_id: str,
    resumed_at: int | None,
) -> list[MetricSink]:
    """The sinks named (after `check_installed`); `resumed_at` is the checkpoint's step."""
    sinks: list[MetricSink] = []
    if "tensorboard" in names:
        sinks.append(TensorBoardSink(run_dir, resumed_at))
    if "wandb" in names:
        sinks.append(WandbSink(run_dir, config, run_id))
    return sinks
