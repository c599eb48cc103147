"""A run's lifecycle: start (or resume) a run directory, train to the end, finish or fail."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from apr_cli.distill.checkpoints import load_latest_checkpoint
from apr_cli.distill.config_file import CONFIG_FILE, write_config
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
from apr_cli.distill.rundir import LOSS_PLOT, MANIFEST, VICTORY_LOG, RunDirectory, utc_now
from apr_cli.distill.signals import (
    RunInterrupted,
    StopSignals,
    WarmUpInterrupted,
    warm_up_signals,
)
from apr_cli.distill.watch import RunWatch
from apr_cli.errors import AprError, from_os_error, os_reason
from apr_cli.model.checkpoint import save_model
from apr_cli.model.config import ModelConfig
from apr_cli.model.qwen2 import Qwen2ForCausalLM, meta_model

TEACHER_WARMED = "teacher-warmed.apr"


def start(
    p: Prepared,
    out: Path,
    *,
    overwrite: bool = False,
    emit: Emit = print,
    on_warmup: Callable[[int, int], None] | None = None,
) -> tuple[RunDirectory, dict[str, Any]]:
    """Create (and lock) the run directory and its manifest, and warm up a preset teacher.

    `on_warmup(step, steps)` follows the warm-up.
    """
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

    def emit_and_log(line: str) -> None:
        emit(line)
        run.log(line)

    try:
        with warm_up_signals():  # before the first line: a signal right after it is handled
            run.write_manifest(manifest)
            if run.writable:
                write_config(run.path / CONFIG_FILE, p.options)
            for line in (dataset_line(p.options), *p.warnings):
                emit_and_log(line)
            manifest["teacher_warmup"] = warm_up_teacher(p, emit_and_log, on_warmup)
            if manifest["teacher_warmup"] is not None and run.writable:
                # A resumed run must distill from this same teacher, not warm up a new one.
                save_model(p.teacher, run.path / TEACHER_WARMED)
    except BaseException as e:
        raise finish_failed(run, manifest, e, steps_completed=0) from None
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
    """Reopen (and lock) a run at its newest readable checkpoint with `requested`'s changes.

    A setting left at its command's `defaults` keeps the run's value; changes that would alter
    the result are refused. Every check runs before anything is written, so a refused resume
    leaves the run as it was.
    """
    # Under torchrun rank 0 alone writes, and locks before the process group is even joined.
    run = RunDirectory(run_dir, writable=os.environ.get("RANK", "0") == "0")
    run.lock("--resume")
    try:
        p, manifest, path, checkpoint, skipped = check_resume(run, requested, defaults)
    except BaseException:
        run.unlock()
        raise
    run.writable = p.backend.is_main
    emit = main_only(emit, p)
    step = checkpoint["pipeline"]["step"]
    try:
        run.remove_temporaries()
        lines = [dataset_line(p.options)]
        for bad, reason in skipped:  # kept aside: a later save must not count it as newest
            if run.writable:
                bad.rename(bad.with_name(bad.name + ".corrupt"))
            lines.append(
                f"warning: checkpoint {bad.name} cannot be read ({reason}); "
                f"resuming from {path.name} (kept as {bad.name}.corrupt)"
            )
        run.truncate_logs(checkpoint["log_bytes"], step)
        manifest.update(
            status="running",
            options=p.options.to_dict(),
            hyperparameters=p.options.train.to_dict(),
            backend=p.backend.describe(),
        )
        manifest.setdefault("resumed", []).append(
            {"from_step": step, "checkpoint": str(path), "at": utc_now(), "command": sys.argv}
        )
        for key in ("error", "finished_at"):
            manifest.pop(key, None)
        run.write_manifest(manifest)
        if run.writable:
            write_config(run.path / CONFIG_FILE, p.options)
        for line in (*lines, f"resumed from {path.name} (step {step})"):
            emit(line)
            run.log(line)
    except BaseException as e:
        raise finish_failed(run, manifest, e, steps_completed=step) from None
    return p, run, manifest, checkpoint


def check_resume(
    run: RunDirectory, requested: DistillOptions, defaults: DistillOptions
) -> tuple[Prepared, dict[str, Any], Path, dict[str, Any], list[tuple[Path, str]]]:
    """Everything a resume needs, read and checked; writes nothing."""
    manifest = run.read_manifest()
    if manifest is None or "options" not in manifest:
        raise AprError(f"--resume {run.path}: not a run directory (no readable dispatch.json)")
    path, checkpoint, skipped = load_latest_checkpoint(run.path)
    saved = DistillOptions.from_dict(checkpoint["options"], source=f"checkpoint {path}")
    options = resumed_options(saved, requested.absolute(), defaults, run.path)
    step = checkpoint["pipeline"]["step"]
    if options.train.steps < step:
        raise AprError(f"--steps {options.train.steps} is below the checkpoint's step {step}")
    if options.train.steps == step and manifest.get("status") == "completed":
        raise NothingToResume(
            f"--resume {run.path}: the run completed all {step} steps; nothing changed "
            f"(pass --steps N above {step} to train further)"
        )
    warmed = run.path / TEACHER_WARMED
    load = replace(options, teacher=str(warmed), teacher_warmup=0) if warmed.is_dir() else options
    p = prepare(load)
    p.options = options
    # The data must be where the checkpoint left it (e.g. no shard added since).
    p.source.load_state_dict(checkpoint["pipeline"]["source"])
    return p, manifest, path, checkpoint, skipped


def train_run(
    p: Prepared,
    run: RunDirectory,
    manifest: dict[str, Any],
    *,
    state: dict[str, Any] | None = None,
    emit: Emit = print,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Train to the last step (from checkpoint `state` on resume), save, finalize the manifest."""
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
        teacher_cache=p.teacher_cache,
        sampler=sampler,
    )
    stop, watch = StopSignals(), None
    try:
        if state is not None:
            pipeline.load_state_dict(state["pipeline"])
        resumed_at = None if state is None else pipeline.step
        watch = RunWatch.open(
            p,
            run,
            started_at=manifest["started_at"],
            resumed_at=resumed_at,
            save_student=save_student,
        )
        if state is not None:
            watch.load_state_dict(state.get("validation"))
        reporter = RunReporter(run, pipeline, p.options, emit, on_progress, watch)
        with stop.installed():
            result = pipeline.train(
                reporter, should_stop=lambda: any_rank(stop.requested(), p.backend)
            )
            reporter.checkpoint()
            if stop.signum is not None:
                command = "distill" if p.options.distills else "train"
                raise RunInterrupted(stop.signum, run.path, pipeline.step, command)
        save_student(pipeline, run.student_dir)
        if run.writable:
            write_loss_plot(run.path / LOSS_PLOT, run.loss_history(p.options.distills))
        final = (
            f"{p.verb} complete: initial_loss={result.initial_loss:.4f} -> "
            f"final_loss={result.final_loss:.4f} ({result.steps} steps, {result.wall_s:.1f} s)"
        )
        for line in (final, f"Output: {run.path}"):
            emit(line)
            run.log(line)
        manifest.update(
            status="completed", finished_at=utc_now(), **summary(result), **watched(watch)
        )
        run.write_manifest(manifest)
    except BaseException as e:
        if pipeline.losses and run.writable:
            manifest.update(summary(pipeline.result()), **watched(watch))
        plot = bool(pipeline.losses) and run.writable
        raise finish_failed(run, manifest, e, pipeline.step, plot, p.options.distills) from None
    finally:
        if watch is not None:
            watch.close()
    run.unlock()
    return manifest


def save_student(pipeline: Pipeline, path: Path) -> None:
    """Save the student as a model folder (collective: every rank calls; rank 0 writes)."""
    weights = pipeline.student_state()  # gathers shards under FSDP2
    if pipeline.backend.is_main:
        save_model(model_from_state(pipeline.student.config, weights), path)


def watched(watch: RunWatch | None) -> dict[str, Any]:
    """The manifest's entries from the watch (none when it never opened)."""
    return {} if watch is None else watch.summary()


def model_from_state(config: ModelConfig, state: dict[str, torch.Tensor]) -> Qwen2ForCausalLM:
    """A plain model holding `state`, without a second initialisation of the weights."""
    model = meta_model(config)
    model.load_state_dict(state, assign=True)
    return model


def finish_failed(
    run: RunDirectory,
    manifest: dict[str, Any],
    error: BaseException,
    steps_completed: int,
    plot: bool = False,
    with_teacher: bool = True,
) -> BaseException:
    """Record why a run stopped early (interrupted or failed), unlock it; the error to raise.

    Each record is best effort: on a full disk the first error is the one to report, and what
    could not be recorded is added to its message.
    """
    interrupted = isinstance(error, (RunInterrupted, WarmUpInterrupted, KeyboardInterrupt))
    if isinstance(error, OSError):
        error = from_os_error(error)
    manifest.update(
        status="interrupted" if interrupted else "failed",
        error=str(error) or type(error).__name__,
        finished_at=utc_now(),
        steps_completed=steps_completed,
    )
    unrecorded = []
    records = [
        (MANIFEST, lambda: run.write_manifest(manifest)),
        (VICTORY_LOG, lambda: run.log(f"{manifest['status']}: {manifest['error']}")),
    ]
    if plot:
        path = run.path / LOSS_PLOT
        records.append((LOSS_PLOT, lambda: write_loss_plot(path, run.loss_history(with_teacher))))
    for name, record in records:
        try:
            record()
        except (OSError, AprError) as e:
            unrecorded.append(f"{name} ({os_reason(e)})")
    run.unlock()
    if unrecorded and isinstance(error, AprError):
        note = f"; could not record it in {', '.join(unrecorded)}"
        return AprError(f"{error}{note}", error.exit_code)
    return error
