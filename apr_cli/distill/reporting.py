"""What a run tells: step lines to the terminal, victory log and metrics; manifest contents."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import apr_cli
from apr_cli.distill.checkpoints import save_checkpoint
from apr_cli.distill.options import DistillOptions
from apr_cli.distill.pipeline import Pipeline, StepMetrics, TrainResult
from apr_cli.distill.prepare import Prepared
from apr_cli.distill.rundir import RunDirectory, format_step
from apr_cli.distill.watch import RunWatch

Emit = Callable[[str], None]


class RunReporter:
    """Sends each step to the terminal, victory log, metrics.jsonl and watch; checkpoints."""

    def __init__(
        self,
        run: RunDirectory,
        pipeline: Pipeline,
        options: DistillOptions,
        emit: Emit,
        on_progress: Callable[[int, int], None] | None,  # (step, steps) after each step
        watch: RunWatch,
    ):
        self.run, self.pipeline, self.options = run, pipeline, options
        self.emit, self.on_progress, self.watch = emit, on_progress, watch

    def on_step(self, metrics: StepMetrics) -> None:
        line = format_step(metrics, with_teacher=self.options.distills)
        self.emit(line)
        self.run.log(line)
        self.run.append_metrics(metrics)
        eval_line = self.watch.on_step(metrics, self.pipeline)  # before the checkpoint below
        if eval_line is not None:
            self.emit(eval_line)
            self.run.log(eval_line)
        every = self.options.save_every
        if every and metrics.step % every == 0 and metrics.step < metrics.steps:
            self.checkpoint()
        if self.on_progress is not None:
            self.on_progress(metrics.step, metrics.steps)

    def checkpoint(self) -> None:
        """Save the pipeline and how far the logs had got, so a resume can cut them back.

        Every rank takes part in gathering the state; rank 0 writes it.
        """
        state = {
            "pipeline": self.pipeline.state_dict(),
            "log_bytes": self.run.log_size(),
            "options": self.options.to_dict(),
            "validation": self.watch.state_dict(),
        }
        if self.run.writable:
            save_checkpoint(self.run.path, self.pipeline.step, state, self.options.keep_checkpoints)


def main_only(emit: Emit, p: Prepared) -> Emit:
    """Rank 0 speaks for the run; other ranks print nothing."""
    return emit if p.backend.is_main else (lambda line: None)


def dataset_line(options: DistillOptions) -> str:
    if options.dataset is None:
        return "dataset: (synthetic)"
    return f"dataset: {options.dataset} (real corpus via --dataset)"


def git_commit() -> str | None:
    """The commit of the checkout apr runs from, if it runs from one."""
    try:
        out = subprocess.run(
            ["git", "-C", str(Path(apr_cli.__file__).parent), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment() -> dict[str, Any]:
    return {
        "command": sys.argv,
        "cwd": os.getcwd(),  # where the command's relative paths were given from
        "apr_version": apr_cli.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "git_commit": git_commit(),
        "host": socket.gethostname(),
        "cpu_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }


def summary(result: TrainResult) -> dict[str, Any]:
    return {
        "initial_loss": result.initial_loss,
        "final_loss": result.final_loss,
        "best_loss": result.best_loss,
        "loss_delta": result.final_loss - result.initial_loss,
        "steps": result.steps,
        "tokens": result.tokens,
        "wall_time_s": result.wall_s,
        "sec_per_step": result.sec_per_step,
        "tokens_per_s": result.tokens_per_s,
    }
