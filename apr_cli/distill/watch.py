"""Watching a run: evals on held-out data, the metric sinks and the best student, step by step."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from apr_cli.distill.config_file import flat_values
from apr_cli.distill.parallel import any_rank
from apr_cli.distill.pipeline import Pipeline, StepMetrics
from apr_cli.distill.prepare import Prepared
from apr_cli.distill.rundir import RunDirectory
from apr_cli.distill.sinks import (
    MetricSink,
    open_sinks,
    parse_report_to,
    train_scalars,
    val_scalars,
)
from apr_cli.distill.validation import Validator, format_eval

BEST_STUDENT = "student-best.apr"


def wandb_run_id(run_dir: Path, started_at: str) -> str:
    """One W&B run per run directory: the same id for every resume of it."""
    digest = hashlib.sha256(f"{run_dir.resolve()}|{started_at}".encode()).hexdigest()
    return f"apr-{digest[:16]}"


class RunWatch:
    """After each step: send it to the sinks; when due, eval, log it and keep the best student.

    Call order within a step matters for resume: the eval row is written before the step's
    checkpoint, so a resume from that checkpoint neither repeats nor loses it.
    """

    def __init__(
        self,
        run: RunDirectory,
        validator: Validator | None,
        sinks: list[MetricSink],
        keep_best: bool,
        save_student: Callable[[Pipeline, Path], None],
    ):
        self.run, self.validator, self.sinks = run, validator, sinks
        self.keep_best, self.save_student = keep_best, save_student

    @classmethod
    def open(
        cls,
        p: Prepared,
        run: RunDirectory,
        *,
        started_at: str,
        resumed_at: int | None,
        save_student: Callable[[Pipeline, Path], None],
    ) -> RunWatch:
        """The validator (with --val-dataset) and, on rank 0, the sinks asked for."""
        options, cfg = p.options, p.options.train
        validator = None
        if p.val_source is not None:
            validator = Validator(
                p.val_source,
                every=options.eval_every,
                windows=options.eval_windows,
                seq_len=cfg.seq_len,
                batch_size=cfg.batch_size // (cfg.grad_accum * p.backend.world_size),
                backend=p.backend,
            )
        sinks: list[MetricSink] = []
        if run.writable:
            run_id = wandb_run_id(run.path, started_at)
            names = parse_report_to(options.report_to)
            sinks = open_sinks(names, run.path, flat_values(options), run_id, resumed_at)
        return cls(run, validator, sinks, options.keep_best, save_student)

    def on_step(self, metrics: StepMetrics, pipeline: Pipeline) -> str | None:
        """Report the step to the sinks and eval when due; the eval's log line, if any."""
        for sink in self.sinks:
            sink.log(metrics.step, train_scalars(metrics))
        v = self.validator
        if v is None or not v.due(metrics.step, metrics.steps):
            return None
        row = v.run(metrics.step, pipeline.student, pipeline.teacher, pipeline.model)
        self.run.append_record(row)
        for sink in self.sinks:
            sink.log(metrics.step, val_scalars(row))
        # Every rank saves together: gathering the weights is collective under FSDP2.
        if self.keep_best and any_rank(v.is_best(row), pipeline.backend):
            self.save_student(pipeline, self.run.path / BEST_STUDENT)
        teacher_loss = v.teacher_loss if len(v.history) == 1 else None
        return format_eval(row, metrics.steps, teacher_loss)

    def state_dict(self) -> dict[str, Any] | None:
        return None if self.validator is None else self.validator.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.validator is not None and state is not None:
            self.validator.load_state_dict(state)

    def summary(self) -> dict[str, Any]:
        """The manifest's `validation` entry (empty without --val-dataset)."""
        return {} if self.validator is None else {"validation": self.validator.summary()}

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
