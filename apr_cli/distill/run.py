"""A run's lifecycle: start (or resume) a run directory, train to the end, finish or fail."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from apr_cli.distill.checkpoints import load_latest_checkpoint
from apr_cli.distill.on_policy import SampledBatches
from apr_cli.distill.options import DistillOptions, resumed_options
from apr_cli.distill.parallel import any_rank
from apr_cli.distill.pipeline import Pipeline
from apr_cli.distill.plot import write_loss_plot
from apr_cli.distill.prepare import Prepared, plan, prepare, warm_up_teacher
from apr_cli.distill.reporting import (
    Emit,
    RunReporter,
    dataset_line,
    environment,
    main_only,
    summary,
)
from apr_cli.distill.rundir import LOSS_PLOT, RunDirectory, utc_now
from apr_cli.distill.signals import RunInterrupted, StopSignals
from apr_cli.errors import AprError
from apr_cli.model.checkpoint import save_model
from apr_cli.model.config import ModelConfig
from apr_cli.model.qwen2 import Qwen2ForCausalLM

TEACHER_WARMED = "teacher-warmed.apr"


def start(
    p: Prepared, out: Path, *, overwrite: bool = False, emit: Emit = print
) -> tuple[RunDirectory, dict[str, Any]]:
    """Create the run directory and its manifest, and warm up a preset teacher."""
    run = RunDirectory.create(out, overwrite=overwrite, writable=p.backend.is_main)
    emit = main_only(emit, p)
    manifest: dict[str, Any] = {
        "status": "running",
        "started_at": utc_now(),
        **environment(),
        "run_dir": str(run.path.resolve()),
        "options": p.options.to_dict(),
        **plan(p),
        "artifacts": run.artifact_paths(),
    }
    run.write_manifest(manifest)

    def emit_and_log(line: str) -> None:
        emit(line)
        run.log(line)

    for line in (dataset_line(p.options), *p.warnings):
        emit_and_log(line)
    try:
        manifest["teacher_warmup"] = warm_up_teacher(p, emit_and_log)
        if manifest["teacher_warmup"] is not None and run.writable:
            # A resumed run must distill from this same teacher, not warm up a new one.
            save_model(p.teacher, run.path / TEACHER_WARMED)
    except BaseException as e:
        finish_failed(run, manifest, e, steps_completed=0)
        raise
    student = f"{p.student_info['spec']} ({p.student_info['parameters']:,} params)"
    models = (
        f"teacher: {p.teacher_info['spec']} ({p.teacher_info['parameters']:,} params) "
        f"student: {student}"
        if p.teacher_info is not None
        else f"model: {student}, cross-entropy on the labels (no teacher)"
    )
    emit_and_log(f"{models} device: {p.backend.name} ({p.backend.compute_dtype})")
    return run, manifest


class NothingToResume(AprError):
    """A finished run resumed with nothing more to do: said, and nothing is written."""

    label = "nothing to do"

    def __init__(self, message: str):
        super().__init__(message, exit_code=0)


def resume(
    run_dir: Path,
    requested: DistillOptions,
    defaults: DistillOptions,
    *,
    emit: Emit = print,
) -> tuple[Prepared, RunDirectory, dict[str, Any], dict[str, Any]]:
    """Reopen a run at its newest checkpoint with the settings `requested` changed.

    A setting left at its command's `defaults` keeps the run's value; changes that would alter
    the result are refused.
    """
    run = RunDirectory(run_dir)
    manifest = run.read_manifest()
    if manifest is None or "options" not in manifest:
        raise AprError(f"--resume {run_dir}: not a run directory (no readable dispatch.json)")
    path, checkpoint = load_latest_checkpoint(run.path)
    saved = DistillOptions.from_dict(checkpoint["options"])
    options = resumed_options(saved, requested, defaults, run_dir)
    step = checkpoint["pipeline"]["step"]
    if options.train.steps < step:
        raise AprError(f"--steps {options.train.steps} is below the checkpoint's step {step}")
    if options.train.steps == step and manifest.get("status") == "completed":
        raise NothingToResume(
            f"--resume {run_dir}: the run completed all {step} steps; nothing changed "
            f"(pass --steps N above {step} to train further)"
        )
    warmed = run.path / TEACHER_WARMED
    load = replace(options, teacher=str(warmed), teacher_warmup=0) if warmed.is_dir() else options
    p = prepare(load)
    p.options = options
    run.writable = p.backend.is_main
    emit = main_only(emit, p)
    run.truncate_logs(checkpoint["log_bytes"], step)
    manifest.update(
        status="running",
        options=options.to_dict(),
        hyperparameters=options.train.to_dict(),
        backend=p.backend.describe(),
    )
    manifest.setdefault("resumed", []).append(
        {"from_step": step, "checkpoint": str(path), "at": utc_now(), "command": sys.argv}
    )
    for key in ("error", "finished_at"):
        manifest.pop(key, None)
    run.write_manifest(manifest)
    for line in (dataset_line(options), f"resumed from {path.name} (step {step})"):
        emit(line)
        run.log(line)
    return p, run, manifest, checkpoint["pipeline"]


def train_run(
    p: Prepared,
    run: RunDirectory,
    manifest: dict[str, Any],
    *,
    state: dict[str, Any] | None = None,
    emit: Emit = print,
    on_progress: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Train to the last step (from `state` when resuming), save, and finalize the manifest."""
    emit = main_only(emit, p)
    sampler = None
    if p.prompts is not None:
        sampler = SampledBatches(
            p.options.on_policy,
            p.prompts,
            p.options.train.seed,
            p.backend.rank,
            p.backend.world_size,
            p.backend.device,
        )
    pipeline = Pipeline(
        p.student,
        p.teacher,
        p.options.train,
        p.source,
        p.backend,
        parallel="fsdp" if p.options.fsdp else "ddp",
        sampler=sampler,
    )
    if state is not None:
        pipeline.load_state_dict(state)
    reporter = RunReporter(run, pipeline, p.options, emit, on_progress)
    stop = StopSignals()
    try:
        with stop.installed():
            result = pipeline.train(
                reporter, should_stop=lambda: any_rank(stop.requested(), p.backend)
            )
            reporter.checkpoint()
            if stop.signum is not None:
                command = "train" if p.teacher is None else "distill"
                raise RunInterrupted(stop.signum, run.path, pipeline.step, command)
        weights = pipeline.student_state()  # collective: gathers shards under FSDP2
        if run.writable:
            save_model(model_from_state(p.student.config, weights), run.student_dir)
            write_loss_plot(run.path / LOSS_PLOT, run.loss_history(p.teacher is not None))
    except BaseException as e:
        if pipeline.losses and run.writable:
            manifest.update(summary(pipeline.result()))
            write_loss_plot(run.path / LOSS_PLOT, run.loss_history(p.teacher is not None))
        finish_failed(run, manifest, e, steps_completed=pipeline.step)
        raise
    manifest.update(status="completed", finished_at=utc_now(), **summary(result))
    run.write_manifest(manifest)
    final = (
        f"{p.verb} complete: initial_loss={result.initial_loss:.4f} -> "
        f"final_loss={result.final_loss:.4f} ({result.steps} steps, {result.wall_s:.1f} s)"
    )
    for line in (final, f"Output: {run.path}"):
        emit(line)
        run.log(line)
    return manifest


def model_from_state(config: ModelConfig, state: dict[str, torch.Tensor]) -> Qwen2ForCausalLM:
    """A plain model holding `state`, without a second initialisation of the weights."""
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    model.load_state_dict(state, assign=True)
    return model


def finish_failed(
    run: RunDirectory, manifest: dict[str, Any], error: BaseException, steps_completed: int
) -> None:
    """Record why a run stopped early: interrupted by a signal, or failed."""
    interrupted = isinstance(error, (RunInterrupted, KeyboardInterrupt))
    manifest.update(
        status="interrupted" if interrupted else "failed",
        error=str(error) or type(error).__name__,
        finished_at=utc_now(),
        steps_completed=steps_completed,
    )
    run.write_manifest(manifest)
    run.log(f"{manifest['status']}: {manifest['error']}")
